"""Session-wide test setup."""

import importlib.util
import os

# Keras (parity tests) must run on the torch backend; set before anything imports keras.
os.environ.setdefault("KERAS_BACKEND", "torch")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from image_folders import make_image_folder  # noqa: E402


def _import_triton_in_interpreter_mode() -> None:
    # Triton decorates its own language functions (tl.zeros, tl.sum, ...) once, when first
    # imported: interpreted if TRITON_INTERPRET=1 at that moment, compiled otherwise. Without a GPU
    # the kernel tests run under the interpreter, so Triton must be imported in that mode before
    # torch.compile / torch.export in other tests import it in compiled mode. The variable is
    # restored at once: only tests that ask for the interpreter use it.
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


_import_triton_in_interpreter_mode()


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
