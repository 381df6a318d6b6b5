"""Compile the fused Triton kernels for a GPU that is not here: ``python tests/triton_aot.py [CC]``.

The interpreter (how the other kernel tests run) does not lower anything, so it cannot see what
only the GPU compiler would refuse, or a kernel that needs more shared memory than a GPU has. This
script runs the fused network's plan on CPU tensors with the two kernel launches replaced by
recorders, so it sees exactly the launches the model makes (argument types, flags, block sizes,
warps) for the seed config and three variants, fp32 and bf16, at 299x299 and a small size. It then
compiles a set of those launches that covers every flag value and block size for CUDA compute
capability CC (default 90, the H100) with Triton's own compiler and ptxas, and prints one JSON
object per compiled kernel: name, flags, warps, shared memory in bytes.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, GPU block sizes

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import xception  # noqa: E402
from xception import kernels  # noqa: E402
from xception.kernels import triton_kernels as tk  # noqa: E402
from xception.optimize import FusedXception, randomize_batchnorm_  # noqa: E402

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **flags)`` records, runs nothing."""

    def __init__(self, fn, seen: dict) -> None:
        self.fn, self.seen = fn, seen

    def __getitem__(self, grid):
        def launch(*args, num_warps: int = 4, **flags):
            types = {name: ("*" + TYPES[a.dtype]) if isinstance(a, torch.Tensor) else
                     ("i32" if -2**31 <= a < 2**31 else "i64") for name, a in zip(self.fn.arg_names, args)}
            key = (self.fn.__name__, tuple(sorted(types.items())), tuple(sorted(flags.items())), num_warps)
            self.seen.setdefault(key, (self.fn, types, flags, num_warps))
        return launch


def record_launches() -> dict:
    seen: dict = {}
    tk._separable_conv_kernel = Recorder(tk._separable_conv_kernel, seen)
    tk._max_pool_add_kernel = Recorder(tk._max_pool_add_kernel, seen)
    kernels._tk = tk
    kernels.triton_usable = lambda t: True
    for config in (dict(), dict(pool_padding="same", output_stride=16),
                   dict(intermediate_activation="elu", output_stride=8, middle_blocks=1),
                   dict(residual=False, middle_blocks=0)):
        torch.manual_seed(0)
        model = randomize_batchnorm_(xception.create_model("xception", **config)).eval()
        for dtype in (torch.bfloat16, torch.float32):
            fused = FusedXception(model, dtype)
            for shape in ((1, 3, 299, 299), (2, 3, 64, 64)):
                x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    fused(x)  # outputs are uninitialised memory: only the launches matter
    return seen


def covering(seen: dict) -> list:
    """Launches that together show every (kernel, argument type, flag value, warps) at least once."""
    chosen, covered = [], set()
    for key, launch in seen.items():
        name, types, flags, warps = key
        items = {(name, "x", dict(types).get("x_ptr"))} | {(name, k, v) for k, v in flags} | {(name, "warps", warps)}
        if not items <= covered:
            covered |= items
            chosen.append(launch)
    return chosen


def main(cc: int) -> None:
    target = GPUTarget("cuda", cc, 32)
    for fn, types, flags, warps in covering(record_launches()):
        signature = {a: ("constexpr" if a in flags else types[a]) for a in fn.arg_names}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=flags), target=target,
                                  options={"num_warps": warps})
        print(json.dumps({"kernel": fn.__name__, "x": types.get("x_ptr"), "flags": flags, "num_warps": warps,
                          "shared": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"])}),
              flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
