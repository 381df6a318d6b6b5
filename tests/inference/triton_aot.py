"""Compile the fused Triton kernels for a GPU that is not here: ``python tests/inference/triton_aot.py [CC]``.

The interpreter (how the other kernel tests run) does not lower anything, so it cannot see what
only the GPU compiler would refuse, or a kernel that needs more shared memory than a GPU has. This
script runs the fused network's plan on CPU tensors with the two kernel launches replaced by
recorders, so it sees exactly the launches the model makes (argument types, flags, block sizes,
warps) for the seed config and three variants, fp32 and bf16, at 299x299 (batch 1 and 4) and a
small size. It then
compiles a set of those launches that covers every flag value and block size for CUDA compute
capability CC (default 90, the H100) with Triton's own compiler and ptxas, and prints one JSON
object per compiled kernel: name, flags, warps, shared memory in bytes, and (read with the
cuobjdump that ships with Triton) registers and stack bytes per thread: stack means spills.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, GPU block sizes

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402

import xception  # noqa: E402
from xception.inference import kernels  # noqa: E402
from xception.inference.kernels import triton_kernels as tk  # noqa: E402
from xception.inference.bench import randomize_batchnorm_  # noqa: E402
from xception.inference.fused import FusedXception  # noqa: E402


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **flags)`` records, runs nothing.

    Arguments are specialised the way a real launch does it (Triton's own ``specialize_impl``):
    an int equal to 1 becomes a constant (e.g. the channel stride of a channels-last tensor,
    which lets loads along channels vectorise), ints and pointers divisible by 16 are marked so.
    """

    def __init__(self, fn, seen: dict, backend) -> None:
        self.fn, self.seen, self.backend = fn, seen, backend

    def __getitem__(self, grid):
        def launch(*args, num_warps: int = 4, **flags):
            signature, consts, attrs = {}, dict(flags), {}
            for i, (name, a) in enumerate(zip(self.fn.arg_names, args)):
                kind, attr = native_specialize_impl(type(self.backend), a, False, True, True)
                if kind == "constexpr":
                    consts[name] = a
                else:
                    signature[name] = kind
                    if attr:
                        attrs[(i,)] = self.backend.parse_attr(attr)
            key = (self.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(consts.items())),
                   tuple(sorted((k, str(v)) for k, v in attrs.items())), num_warps)
            self.seen.setdefault(key, (self.fn, signature, consts, attrs, flags, num_warps))
        return launch


def record_launches(target: GPUTarget) -> dict:
    seen: dict = {}
    backend = make_backend(target)
    tk._separable_conv_kernel = Recorder(tk._separable_conv_kernel, seen, backend)
    tk._max_pool_add_kernel = Recorder(tk._max_pool_add_kernel, seen, backend)
    kernels._tk = tk
    kernels.triton_usable = lambda t: True
    for config in (dict(), dict(pool_padding="same", output_stride=16),
                   dict(intermediate_activation="elu", output_stride=8, middle_blocks=1),
                   dict(residual=False, middle_blocks=0)):
        torch.manual_seed(0)
        model = randomize_batchnorm_(xception.create_model("xception", **config)).eval()
        for dtype in (torch.bfloat16, torch.float32):
            fused = FusedXception(model, dtype)
            for shape in ((1, 3, 299, 299), (4, 3, 299, 299), (2, 3, 64, 64)):
                x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
                with torch.no_grad():
                    fused(x)  # outputs are uninitialised memory: only the launches matter
    return seen


def covering(seen: dict) -> list:
    """Launches that together show every (kernel, argument type, flag value, warps) at least once."""
    chosen, covered = [], set()
    for launch in seen.values():
        fn, signature, _, _, flags, warps = launch
        name = fn.__name__
        items = ({(name, "x", signature.get("x_ptr"))} | {(name, k, v) for k, v in flags.items()}
                 | {(name, "warps", warps)})
        if not items <= covered:
            covered |= items
            chosen.append(launch)
    return chosen


def compile_launch(launch: tuple, target: GPUTarget):
    fn, signature, consts, attrs, flags, warps = launch
    full = {a: ("constexpr" if a in consts else signature[a]) for a in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs), target=target,
                          options={"num_warps": warps})


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack (spill) bytes per thread, read by the cuobjdump that ships with Triton."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK):(\d+)", out))
    return {"registers": int(found["REG"]), "stack": int(found["STACK"])} if len(found) == 2 else {}


def main(cc: int) -> None:
    target = GPUTarget("cuda", cc, 32)
    for launch in covering(record_launches(target)):
        fn, signature, _, _, flags, warps = launch
        compiled = compile_launch(launch, target)
        print(json.dumps({"kernel": fn.__name__, "x": signature.get("x_ptr"), "flags": flags, "num_warps": warps,
                          "shared": compiled.metadata.shared, "cubin_bytes": len(compiled.asm["cubin"]),
                          **resource_usage(compiled.asm["cubin"])}),
              flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
