"""What this CPU can do: its feature flags and the fast paths they allow (one place for every probe)."""

from __future__ import annotations


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether bf16 arithmetic is native here (AVX-512 BF16 or AMX). Without it oneDNN emulates
    bf16: a 361x728x728 bf16 product ran at 1 GMAC/s on an AVX2 CPU against 76 in fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot(flags: set[str] | None = None) -> bool:
    """Whether the CPU has int8 dot-product instructions (VNNI or AMX), which the dynamic path's
    ``torch._int_mm`` needs to be fast (1.4 GMAC/s on an AVX2 CPU without them)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
