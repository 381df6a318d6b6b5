"""Where and how a command runs, for training and inference alike: the device (``"auto"``), mixed
precision, and the torchrun environment -> process group with the reductions across ranks.

Single node, N GPUs (or N CPU processes with gloo)::

    torchrun --nproc_per_node=N -m xception train --data DATA --out RUN

Multi-node (run on every node; RUN and DATA on a shared file system)::

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m xception train --data DATA --out RUN

Without torchrun's variables (``WORLD_SIZE`` unset or 1) everything runs in one process.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` -> this process's GPU."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device("cpu")


def setup(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU); quiet other ranks."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (in place on a copy); identity in a single process."""
    t = t.clone()
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank (e.g. a stop signal that reached only some)."""
    return any_rank_each([flag], device)[0]


def any_rank_each(flags: Sequence[bool], device: torch.device) -> list[bool]:
    """For each flag, whether it is true on any rank: several decisions, one all-reduce."""
    if not _active():
        return [bool(f) for f in flags]
    return [v > 0 for v in all_reduce_sum(torch.tensor([int(f) for f in flags], device=device)).tolist()]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_error(message: str | None) -> str | None:
    """Share rank 0's error message (or None) with every rank, so all of them stop together."""
    if not _active():
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- mixed precision --------------------------------------------------------------------------------


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 (fp16 on GPUs without bf16) on CUDA, off on CPU (where bf16 training is slower)."""
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'off', got {amp!r}")
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype`` on ``device``'s type, or nothing when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch moved to ``device`` (asynchronously from pinned memory), channels-last if asked."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    """A tqdm bar over ``iterable`` on stderr when ``enabled``, else the iterable itself."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
