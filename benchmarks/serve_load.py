"""Load on 127.0.0.1: ``xception serve`` against the peers a user would otherwise run, on the same
weights, the same machine, one after another in one run.

    python benchmarks/serve_load.py WEIGHTS --levels 1,8,32 --duration 60 --out benchmarks/serve_load.json
    python benchmarks/serve_load.py WEIGHTS --soak 600 --levels 16     # ours only, memory start/end

Servers: ``ours`` (``xception serve``), ``one-at-a-time`` (a hand-written FastAPI route, no
batching: ``serve_peers/one_at_a_time.py``). Each level runs N concurrent clients for the duration
(bounded: they stop by themselves), each posting a fixed set of JPEG and PNG files of mixed sizes in
turn. Reported per level: images/s, p50 / p95 / p99 latency, every non-200 by status, and (soak)
the resident memory of every server process at start and end. JSON on stdout or in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PEERS = {"one-at-a-time": [sys.executable, str(ROOT / "benchmarks" / "serve_peers" / "one_at_a_time.py")]}


def images(count: int = 12, seed: int = 0) -> list[bytes]:
    """JPEG and PNG files of mixed sizes (photo-like: smooth gradients, texture, edges)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = [(320, 240), (640, 480), (1024, 768), (500, 500), (1280, 960), (299, 299)][i % 6]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200
        img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG" if i % 2 == 0 else "PNG", quality=90)
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, weights: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if name == "ours":
        cmd = [sys.executable, "-m", "xception", "serve", "--weights", weights, "--port", str(port), "--device", "cpu",
               "--workers", str(args.workers), "--max-batch-size", str(args.max_batch_size),
               "--batch-timeout-ms", str(args.batch_timeout_ms), "--max-queue", "100000"]
    else:
        cmd = [*PEERS[name], weights, str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def rss_mb(pid: int) -> dict[int, float]:
    """Resident memory (MB) of ``pid`` and its children."""
    found = {}
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                found[p] = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
        except (OSError, StopIteration):
            pass
    return found


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


async def wait_healthy(client, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("server did not become healthy")


async def level(client, bodies: list[bytes], concurrency: int, duration: float) -> dict:
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    stop = time.perf_counter() + duration

    async def user(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                r = await client.post("/predict", content=bodies[i % len(bodies)])
                key = str(r.status_code)
            except Exception as e:  # noqa: BLE001 - counted, never fatal
                key = type(e).__name__
            statuses[key] = statuses.get(key, 0) + 1
            if key == "200":
                latencies.append(time.perf_counter() - t)
            i += 1

    start = time.perf_counter()
    await asyncio.gather(*(user(k) for k in range(concurrency)))
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {"concurrency": concurrency, "seconds": wall, "ok": len(latencies), "images_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "failed": {k: v for k, v in statuses.items() if k != "200"}}


async def run(args: argparse.Namespace) -> dict:
    import httpx

    bodies = images()
    report = {"weights": args.weights, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "cpu_flags": _cpu_class(), "levels": args.levels, "duration_s": args.soak or args.duration, "servers": {}}
    for name in args.servers:
        proc, url = start(name, args.weights, args)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=args.timeout,
                                         limits=httpx.Limits(max_connections=max(args.levels) + 4)) as client:
                await wait_healthy(client)
                await level(client, bodies, 2, 3.0)  # warm-up, not reported
                before = rss_mb(proc.pid)
                rows = [await level(client, bodies, c, args.soak or args.duration) for c in args.levels]
                report["servers"][name] = {"levels": rows, "rss_mb_start": before, "rss_mb_end": rss_mb(proc.pid)}
                print(json.dumps({name: rows}), file=sys.stderr, flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    if "ours" in report["servers"]:
        for peer in (s for s in report["servers"] if s != "ours"):
            report[f"ours_vs_{peer}"] = [o["images_per_s"] / max(p["images_per_s"], 1e-9) for o, p in
                                         zip(report["servers"]["ours"]["levels"], report["servers"][peer]["levels"])]
    return report


def _cpu_class() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(set(flags) & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per level")
    ap.add_argument("--soak", type=float, default=None, help="one long level (seconds); ours only unless --servers")
    ap.add_argument("--servers", type=lambda s: s.split(","), default=None)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-timeout-ms", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (s)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.servers = args.servers or (["ours"] if args.soak else ["ours", *PEERS])
    report = asyncio.run(run(args))
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
