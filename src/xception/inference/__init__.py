"""Inference, the user path: classify and explain images, predict, evaluate, report.

    classify   Classifier (the Python API), decode_predictions, loading any weights for inference
    predict    classify image files, folders and globs (``xception predict``)
    evaluate   the evaluation pass, and any weights on held-out data (``xception eval``)
    explain    class-activation maps (Grad-CAM, Grad-CAM++, ...)
    report     eval --report: confusion matrix, per-class precision/recall/F1, mistakes gallery
    summary    the layer table (torchinfo)

The fast paths it runs live in :mod:`xception.deploy`.
"""

from .classify import Classifier, Explanation, Prediction, decode_predictions

__all__ = ["Classifier", "Explanation", "Prediction", "decode_predictions"]
