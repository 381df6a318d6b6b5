"""The HTTP inference service (``xception serve``).

    app       Service / ServeConfig: the Starlette app, its limits, metrics and graceful stop
    batcher   dynamic batching over a pool of worker processes, each replaced if it dies
    worker    the inference process: the model on its fastest path, batches in, probabilities out
"""

from .app import ServeConfig, Service

__all__ = ["ServeConfig", "Service"]
