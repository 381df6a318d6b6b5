"""Our CPU kernels (C++, AVX2), built on first use and cached: the int8 depthwise and pointwise
convolutions of the static int8 path (``torch.ops.xception.dw_conv_int8`` / ``pw_conv_int8``;
how they work: ``int8.cpp``).

The source is compiled once per source, torch version and compiler into
``$XDG_CACHE_HOME/xception/kernels`` (``~/.cache/xception/kernels``; ``XCEPTION_KERNEL_CACHE``
overrides it), which takes ~20 s, then loaded with ``torch.ops.load_library``. Without a C++
compiler, on a CPU without AVX2 + FMA, or with ``XCEPTION_CPU_KERNELS=0``, :func:`load` says why
once and returns False; the int8 model then runs PyTorch's own quantized kernels (slower; the
same results up to rounding and the pointwise weights' 7-bit rounding, see ``int8.cpp``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from ..cpu import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8.cpp")
FLAGS = ["-O3", "-std=c++20", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared"]
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "why": str


def cache_dir() -> Path:
    if os.environ.get("XCEPTION_KERNEL_CACHE"):
        return Path(os.environ["XCEPTION_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xception" / "kernels"


def _unusable() -> str | None:
    """Why the kernels cannot run here, or None."""
    if os.environ.get("XCEPTION_CPU_KERNELS", "1") == "0":
        return "XCEPTION_CPU_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"):
        return f"they are built for x86-64 Linux, this is {sys.platform} {platform.machine()}"
    if not {"avx2", "fma"} <= cpu_flags():
        return "this CPU has no AVX2 + FMA"
    return None


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _build(cxx: str) -> Path:
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch_cpu"]
    abi = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, torch.__version__.encode(), cxx.encode(), " ".join(FLAGS).encode()]))
    target = cache_dir() / f"xception_cpu_{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building the int8 CPU kernels (once, ~20 s) into %s", target.parent)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, *abi, *includes, str(SOURCE), "-o", tmp, *libs]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or [f"exit {done.returncode}"]
            raise RuntimeError(f"{Path(cxx).name} failed: {errors[0].strip()}")
        os.replace(tmp, target)  # atomic: a concurrent build or reader sees the whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load() -> bool:
    """Build (once) and load our CPU kernels; False (with the reason logged once) where they cannot run."""
    with _lock:
        if "ok" not in _state:
            why = _unusable()
            cxx = _compiler() if why is None else None
            if why is None and cxx is None:
                why = "no C++ compiler found (set CXX)"
            if why is None:
                try:
                    torch.ops.load_library(str(_build(cxx)))
                except Exception as e:  # noqa: BLE001 - any build or load failure: fall back, say why
                    why = f"{type(e).__name__}: {e}"
            _state.update(ok=why is None, why=why)
            if why is not None:
                log.warning("int8 CPU kernels unavailable (%s); using PyTorch's quantized kernels", why)
        return bool(_state["ok"])


def unavailable_reason() -> str | None:
    """Why :func:`load` returned False (None if it was not called or succeeded)."""
    return _state.get("why")  # type: ignore[return-value]
