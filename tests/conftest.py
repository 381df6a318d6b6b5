"""Session-wide test setup."""

import os

# Keras (parity tests) must run on the torch backend; set before anything imports keras.
os.environ.setdefault("KERAS_BACKEND", "torch")

# Under pytest-xdist, each worker gets its share of the cores: two workers of two OpenMP threads
# each on two cores spin at every barrier waiting for a descheduled thread (a deep model's many
# small convs ran 5-10x slower so). Subprocesses the tests start inherit the setting.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402,F401  (before any TensorFlow: triton loaded after TF 2.21's libraries segfaults)

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from image_folders import make_image_folder  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's many small forward passes (a second one mostly spins)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """train: 3 cat + 3 dog; val: 2 + 2 (20 px, colour decides the class)."""
    root = tmp_path_factory.mktemp("tiny")
    return make_image_folder(root, {"train": {"cat": 3, "dog": 3}, "val": {"cat": 2, "dog": 2}})
