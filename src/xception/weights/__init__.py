"""Weights people already have: Keras ``.h5``, timm/Cadene ``.pth``, our ``.safetensors`` and
training checkpoints; the public downloads; loading into models and saving.

    sources    public files, checksums, their preprocessing; the verified download
    readers    any file -> WeightFile (state dict + model name, config, classes, preprocessing)
    keras      Keras HDF5 -> the seed's layout
    matching   state dict vs model: the one check and its one message style
    loading    load_pretrained, load_weights, save_safetensors
"""

from .loading import load_pretrained, load_weights, resolve_source, save_safetensors
from .matching import load_state_dict_checked, match_state_dict, unwrap
from .readers import CHECKPOINT_FORMAT, WeightFile, check_checkpoint, read_weights
from .sources import REMOTE_WEIGHTS, RemoteWeights, download_weights

__all__ = [
    "CHECKPOINT_FORMAT",
    "REMOTE_WEIGHTS",
    "RemoteWeights",
    "WeightFile",
    "check_checkpoint",
    "download_weights",
    "load_pretrained",
    "load_state_dict_checked",
    "load_weights",
    "match_state_dict",
    "read_weights",
    "resolve_source",
    "save_safetensors",
    "unwrap",
]
