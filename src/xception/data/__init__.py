"""Where images come from, for training and inference alike.

    images     the one decoder (EXIF orientation, 16-bit, bomb limit), unreadable samples and the
               collate that skips them, the file / folder / glob expander for prediction
    datasets   scikit-learn's digits, folders of class folders and their splits
    sampling   per-rank samplers and per-sample augmentation seeds (exact resume)
    shards     WebDataset tar shards: writing them, streaming them
    splits     a data argument -> datasets: open_split, training_splits, keyed loaders
"""

from .datasets import DIGITS, DigitsDataset, SafeImageFolder
from .images import Batch, UnreadableImage, collate_skip, expand_inputs, open_image, read_image
from .splits import DataSplits, keyed, open_split, training_splits

__all__ = ["DIGITS", "Batch", "DataSplits", "DigitsDataset", "SafeImageFolder", "UnreadableImage", "collate_skip",
           "expand_inputs", "keyed", "open_image", "open_split", "read_image", "training_splits"]
