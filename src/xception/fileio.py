"""Files written atomically and read safely: the one place the package does either.

* :func:`atomic_path` / :func:`atomic_write`: a file is written under a temporary name in its
  own folder and moved into place (``os.replace``) only when the writer finished without error.
  A crash or an exception leaves the previous file (or no file) and no temporary behind.
* :func:`torch_load_safe`: ``torch.load(weights_only=True)`` with one-line errors. A pickle that
  asks for code is refused and nothing from it runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path``, else it is removed.

    ``suffix`` lets writers that look at the file name (ONNX, ``torch.export``) see the right one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then move it into place."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def torch_load_safe(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors naming ``path``.

    A pickle that asks for a global other than tensors and plain containers is refused (nothing
    from it runs); a truncated or foreign file is a ``ValueError`` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # the restricted unpickler stopped: nothing from the file ran
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise ValueError(f"{path}: refused: unpickling it would call {found[1]}, not build tensors; "
                             "nothing from it was run") from None
        raise ValueError(f"{path}: not a weights file the safe loader (torch.load weights_only=True) "
                         "accepts; nothing from it was run") from None
    except Exception as e:  # RuntimeError (truncated zip), EOFError, ...
        text = _ANSI.sub("", str(e).strip())
        first = text.split(". ")[0].splitlines()[0] if text else type(e).__name__
        raise ValueError(f"{path}: not a readable PyTorch weights file (truncated or corrupt?): {first}") from None
