"""Load on 127.0.0.1: ``xception serve`` against the peers a user would otherwise run, on the same
weights, the same machine, one after another in one run.

    python benchmarks/serve_load.py WEIGHTS --levels 1,8,32 --duration 60 --out benchmarks/serve_load.json
    python benchmarks/serve_load.py WEIGHTS --soak 600 --levels 16     # ours only, memory series
    python benchmarks/serve_load.py WEIGHTS --faults --levels 8        # ours only, faults under load

Servers: ``ours`` (``xception serve``), ``one-at-a-time`` (a hand-written FastAPI route, no
batching: ``serve_peers/one_at_a_time.py``), ``triton`` (NVIDIA Triton Inference Server with its
dynamic batcher, through PyTriton: ``serve_peers/triton_peer.py``; it runs under its own Python,
``$XCEPTION_TRITON_PYTHON``, default ``/tmp/tritonenv/bin/python``, made by
``serve_peers/setup_triton_env.sh``). Each level runs N concurrent clients for the duration
(bounded: they stop by themselves), each posting a fixed set of JPEG and PNG files of mixed sizes in
turn. Reported per level: images/s, p50 / p95 / p99 latency, every non-200 by status; per server,
the resident memory of every process of its tree (the server, its workers; Triton's server binary
and python-backend stub), sampled every ``--rss-every`` seconds over the levels: start, end, max,
growth over the run and over its second half, and the series. JSON on stdout or in --out.

``--faults`` (ours only, started with an API key that the load sends), while ``--levels[0]`` clients
post images: (a) SIGKILL the worker process: failures by status, seconds until a 200 again, the
slowest request (no hang past --timeout); (b) every broken input (expected 4xx each) and odd but
valid ones (expected 200), then /health; (c) SIGTERM to the server: every request sent before the
signal answered 200 (refused / reset connections counted apart from 5xx and hangs), exit code 0,
seconds to exit. Each check has ``ok``; the report's top-level ``ok`` maps check -> bool.
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
TRITON_PYTHON = os.environ.get("XCEPTION_TRITON_PYTHON", "/tmp/tritonenv/bin/python")
PEERS = {"one-at-a-time": [sys.executable, str(ROOT / "benchmarks" / "serve_peers" / "one_at_a_time.py")],
         "triton": [TRITON_PYTHON, str(ROOT / "benchmarks" / "serve_peers" / "triton_peer.py")]}
API_KEY = "serve-load-faults-key"


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


def start(name: str, weights: str, args: argparse.Namespace, api_key: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if name == "ours":
        cmd = [sys.executable, "-m", "xception", "serve", "--weights", weights, "--port", str(port), "--device", "cpu",
               "--workers", str(args.workers), "--max-batch-size", str(args.max_batch_size),
               "--batch-timeout-ms", str(args.batch_timeout_ms), "--max-queue", "100000"]
        if args.streams is not None:
            cmd += ["--streams", str(args.streams)]
        if api_key:
            cmd += ["--api-key", api_key]
    else:
        cmd = [*PEERS[name], weights, str(port)]
        if name == "triton":
            cmd.append(str(args.triton_instances))
        if not Path(cmd[0]).exists():
            raise SystemExit(f"{name}: no interpreter at {cmd[0]} (run benchmarks/serve_peers/setup_triton_env.sh "
                             "or set XCEPTION_TRITON_PYTHON)")
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


def _name(pid: int) -> str:
    """A short name for a process of a server's tree."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    line = " ".join(a for a in argv if a)
    if "spawn_main" in line or "resource_tracker" in line:
        parent = _name(int(_state(pid, "PPid").split()[-1] or 0))
        kind = "resource tracker" if "resource_tracker" in line else "worker" if parent == "xception serve" else "process"
        return f"multiprocessing {kind} of {parent}"
    for key, name in (("resource_tracker", "resource tracker"),
                      ("triton_python_backend_stub", "triton python-backend stub"), ("tritonserver", "tritonserver"),
                      ("xception serve", "xception serve"), ("serve_peers/", Path(argv[1]).name if len(argv) > 1 else "")):
        if key in line:
            return name
    return line[:100]


class RssSampler:
    """Resident memory of every process in a server's tree, every ``every`` seconds."""

    def __init__(self, pid: int, every: float) -> None:
        self.pid, self.every, self.t0 = pid, every, time.perf_counter()
        self.procs: dict[int, dict] = {}

    def sample(self) -> None:
        t = round(time.perf_counter() - self.t0, 1)
        for p, mb in rss_mb(self.pid).items():
            self.procs.setdefault(p, {"name": _name(p), "series": []})["series"].append([t, round(mb, 1)])

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every)

    def report(self) -> dict:
        out = {}
        for p, e in self.procs.items():
            mb = [v for _, v in e["series"]]
            out[str(p)] = {"name": e["name"], "start_mb": mb[0], "end_mb": mb[-1], "max_mb": max(mb),
                           "growth_mb": round(mb[-1] - mb[0], 1),
                           "growth_second_half_mb": round(mb[-1] - mb[len(mb) // 2], 1),
                           "first_s": e["series"][0][0], "last_s": e["series"][-1][0], "samples": len(mb),
                           "series_s_mb": e["series"]}
        return {"every_s": self.every, "processes": out}


async def wait_healthy(client, timeout: float = 600, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was healthy")
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
                await wait_healthy(client, proc=proc)
                await level(client, bodies, 2, 3.0)  # warm-up, not reported
                before = rss_mb(proc.pid)
                sampler = RssSampler(proc.pid, args.rss_every)
                sampling = asyncio.create_task(sampler.run())
                try:
                    rows = [await level(client, bodies, c, args.soak or args.duration) for c in args.levels]
                finally:
                    sampling.cancel()
                sampler.sample()
                report["servers"][name] = {"levels": rows, "rss_mb_start": before, "rss_mb_end": rss_mb(proc.pid),
                                           "rss": sampler.report()}
                print(json.dumps({name: rows}), file=sys.stderr, flush=True)
        finally:
            stopped = stop(proc)
        report["servers"][name]["stop"] = stopped
    if "ours" in report["servers"]:
        for peer in (s for s in report["servers"] if s != "ours"):
            report[f"ours_vs_{peer}"] = [o["images_per_s"] / max(p["images_per_s"], 1e-9) for o, p in
                                         zip(report["servers"]["ours"]["levels"], report["servers"][peer]["levels"])]
    return report


# --- faults under load (--faults, ours only) -------------------------------------------------------

class Load:
    """``n`` clients posting ``bodies`` in turn until stopped; every request kept as
    (sent, done, outcome): the status, or ``timeout`` (no answer within the client timeout),
    ``refused`` (no connection), ``reset`` (the connection closed without an answer). A 503 with
    Retry-After waits that long (1 s at most), as a well-behaved client does."""

    def __init__(self, client, bodies: list[bytes], n: int) -> None:
        self.client, self.bodies, self.n = client, bodies, n
        self.records: list[tuple[float, float, str]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> Load:
        self._tasks = [asyncio.create_task(self._user(k)) for k in range(self.n)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _user(self, k: int) -> None:
        import httpx

        i = k
        while not self._stop.is_set():
            retry = None
            t = time.perf_counter()
            try:
                r = await self.client.post("/predict", content=self.bodies[i % len(self.bodies)])
                key, retry = str(r.status_code), r.headers.get("retry-after")
            except httpx.TimeoutException:
                key = "timeout"
            except httpx.ConnectError:
                key = "refused"
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                key = "reset"
            except Exception as e:  # noqa: BLE001 - counted, never fatal
                key = type(e).__name__
            self.records.append((t, time.perf_counter(), key))
            if key == "503" and retry:
                await asyncio.sleep(min(float(retry), 1.0))
            elif key in ("refused", "reset"):
                await asyncio.sleep(0.05)  # the server is going or gone: no hot loop
            i += 1


def _count(records, keep=lambda r: True) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        if keep(r):
            out[r[2]] = out.get(r[2], 0) + 1
    return dict(sorted(out.items()))


def _slowest(records) -> float:
    return round(max((done - sent for sent, done, _ in records), default=0.0), 3)


async def fault_kill_worker(client, bodies, proc, args) -> dict:
    """(a) SIGKILL the worker under load."""
    load = Load(client, bodies, args.levels[0]).start()
    await asyncio.sleep(args.fault_warmup)
    health = (await client.get("/health")).json()
    old = health.get("worker_pids") or []
    victim = next((p for p in old if p in _children(proc.pid)), None)
    if victim is None:
        await load.stop()
        return {"ok": False, "error": f"no worker pid among the server's children: /health said {health}"}
    t_kill = time.perf_counter()
    os.kill(victim, signal.SIGKILL)
    health_back = new_pids = None
    deadline = t_kill + args.recover_timeout
    while time.perf_counter() < deadline:
        try:
            r = await client.get("/health")  # 200 with a new worker (the old pid may linger until its EOF is read)
            if r.status_code == 200 and r.json().get("workers_ready", 0) >= 1 and victim not in r.json()["worker_pids"]:
                health_back, new_pids = time.perf_counter() - t_kill, r.json().get("worker_pids")
                break
        except Exception:  # noqa: BLE001 - counted by the load, not here
            pass
        await asyncio.sleep(0.2)
    first_200 = None
    while time.perf_counter() < deadline:  # a 200 for a request sent after the kill
        first_200 = min((d for s, d, k in load.records if s > t_kill and k == "200"), default=None)
        if first_200 is not None:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(args.fault_warmup)  # steady again
    await load.stop()
    rec = load.records
    before = _count(rec, lambda r: r[0] <= t_kill and r[1] > t_kill)  # in flight at the kill
    after = _count(rec, lambda r: r[0] > t_kill and (first_200 is None or r[0] <= first_200))
    failed = {k: v for d in (before, after) for k, v in d.items() if k != "200"}
    timeouts = sum(1 for r in rec if r[2] == "timeout")
    slowest = _slowest(rec)
    only_503 = all(k == "503" for k in failed)  # the documented answer for a request its dead worker held
    return {"ok": bool(first_200 is not None and timeouts == 0 and slowest < args.timeout),
            "clients": args.levels[0], "killed_pid": victim, "worker_pids_before": old, "worker_pids_after": new_pids,
            "in_flight_at_kill": before, "sent_after_kill_until_first_200": after,
            "failed_by_status": failed, "failures_all_503_as_documented": only_503,
            "health_200_after_s": None if health_back is None else round(health_back, 2),
            "first_200_after_s": None if first_200 is None else round(first_200 - t_kill, 2),
            "timeouts": timeouts, "slowest_request_s": slowest, "client_timeout_s": args.timeout,
            "all_requests": _count(rec)}


def _state(pid: int, field: str = "State") -> str:
    try:
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field))
    except (OSError, StopIteration):
        return ""


def odd_inputs() -> dict[str, tuple[bytes, dict, str, set[int]]]:
    """name -> (body, headers, route, expected statuses): broken inputs first, then odd valid ones."""
    rng = np.random.default_rng(1)

    def save(img: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        return buf.getvalue()

    photo = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
    jpeg, png = save(photo, "JPEG", quality=90), save(photo, "PNG")
    bad_ihdr = bytearray(png)
    bad_ihdr[29] ^= 0xFF  # the IHDR chunk's CRC (8 signature + 4 length + 4 type + 13 data)
    bad_idat = bytearray(png)
    at = png.index(b"IDAT")
    bad_idat[at + 4 + int.from_bytes(png[at - 4:at], "big")] ^= 0xFF  # the first IDAT chunk's CRC only
    bomb = save(Image.new("1", (20000, 20000)), "PNG")  # ~50 KB on disk, 400 Mpixels in its header
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    wide = Image.fromarray((rng.integers(0, 65535, (200, 300))).astype(np.uint16))
    assert wide.mode == "I;16", wide.mode
    bad_image = {400, 415, 422}
    return {
        "empty_body": (b"", {}, "/predict", {400}),
        "plain_text": (b"this is not an image\n" * 20, {"Content-Type": "text/plain"}, "/predict", bad_image),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], {}, "/predict", bad_image),
        "png_bad_crc_ihdr": (bytes(bad_ihdr), {}, "/predict", bad_image),
        "decompression_bomb_20000x20000": (bomb, {}, "/predict", bad_image),
        "body_30mb": (rng.integers(0, 255, 30 << 20, dtype=np.uint8).tobytes(), {}, "/predict", {413}),
        "wrong_api_key": (jpeg, {"X-API-Key": "wrong"}, "/predict", {401}),
        "missing_api_key": (jpeg, {"X-API-Key": ""}, "/predict", {401}),
        "unknown_route": (jpeg, {}, "/nope", {404}),
        # informational: Pillow does not check IDAT CRCs (the pixels decode), so 200 or 4xx both pass
        "png_bad_crc_idat_only": (bytes(bad_idat), {}, "/predict", {200, 400, 415, 422}),
        "valid_1x1": (save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), {}, "/predict", {200}),
        "valid_gif": (save(photo.convert("P"), "GIF"), {}, "/predict", {200}),
        "valid_png_16bit_I;16": (save(wide, "PNG"), {}, "/predict", {200}),
        "valid_cmyk_jpeg": (save(photo.convert("CMYK"), "JPEG"), {}, "/predict", {200}),
        "valid_exif_rotated_jpeg": (save(photo, "JPEG", exif=exif.tobytes()), {}, "/predict", {200}),
    }


async def fault_odd_inputs(client, bodies, url, args) -> dict:
    """(b) every broken and odd input, each once, while the load runs; then /health."""
    import httpx

    cases = odd_inputs()
    load = Load(client, bodies, args.levels[0]).start()
    await asyncio.sleep(args.fault_warmup)
    results = {}
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, headers={"X-API-Key": API_KEY}) as probe:
        for name, (body, headers, route, expected) in cases.items():
            t = time.perf_counter()
            try:
                r = await probe.post(route, content=body, headers=headers)
                status, text = r.status_code, r.text
                try:
                    answer = r.json()
                    answer = answer.get("error", answer) if isinstance(answer, dict) else answer
                    if isinstance(answer, dict) and "predictions" in answer:
                        answer = f"{len(answer['predictions'])} predictions"
                except ValueError:
                    answer = f"(not JSON) {text[:200]}"
            except Exception as e:  # noqa: BLE001 - a dropped connection is an answer too
                status, answer = type(e).__name__, str(e)[:200]
            results[name] = {"status": status, "expected": sorted(expected), "ok": status in expected,
                             "answer": answer, "seconds": round(time.perf_counter() - t, 3), "body_bytes": len(body)}
        health = (await probe.get("/health")).status_code
    await load.stop()
    load_counts = _count(load.records)
    return {"ok": all(r["ok"] for r in results.values()) and health == 200 and set(load_counts) <= {"200"},
            "inputs": results, "health_after": health, "load_during": load_counts,
            "load_slowest_request_s": _slowest(load.records)}


async def fault_sigterm(client, bodies, proc, args) -> dict:
    """(c) SIGTERM to the server (its pid only, as ``docker stop`` does) under load."""
    load = Load(client, bodies, args.levels[0]).start()
    await asyncio.sleep(args.fault_warmup)
    children = _children(proc.pid)
    t_sig = time.perf_counter()
    os.kill(proc.pid, signal.SIGTERM)
    try:
        code = await asyncio.to_thread(proc.wait, args.recover_timeout)
    except subprocess.TimeoutExpired:
        code = None
    exit_s = time.perf_counter() - t_sig
    await asyncio.sleep(0.5)
    await load.stop()
    rec = load.records
    before = [r for r in rec if r[0] < t_sig]
    after = [r for r in rec if r[0] >= t_sig]
    connection = {"refused", "reset"}
    pre = _count(before)
    pre_5xx = sum(v for k, v in pre.items() if k.isdigit() and k >= "500")
    pre_hung = pre.get("timeout", 0)
    pre_conn = sum(v for k, v in pre.items() if k in connection)
    pre_other = sum(v for k, v in pre.items() if k != "200" and k not in connection and k != "timeout"
                    and not (k.isdigit() and k >= "500"))
    for _ in range(50):  # the worker and resource tracker go with the server (give them 5 s)
        left = [p for p in children if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]
        if not left:
            break
        await asyncio.sleep(0.1)
    return {"ok": bool(code == 0 and pre_5xx == 0 and pre_hung == 0 and pre_conn == 0 and pre_other == 0 and not left),
            "clients": args.levels[0], "exit_code": code, "exit_after_s": round(exit_s, 2),
            "sent_before_signal": pre, "sent_before_signal_200": pre.get("200", 0),
            "sent_before_signal_refused_or_reset": pre_conn, "sent_before_signal_5xx": pre_5xx,
            "sent_before_signal_hung": pre_hung, "sent_before_signal_other": pre_other,
            "sent_after_signal": _count(after), "slowest_request_s": _slowest(rec),
            "last_200_after_signal_s": round(max((d for s, d, k in rec if k == "200"), default=t_sig) - t_sig, 2),
            "children": children, "children_left_running_5s_after_exit": left}


async def run_faults(args: argparse.Namespace) -> dict:
    import httpx

    bodies = images()
    report = {"weights": args.weights, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "mode": "faults", "clients": args.levels[0], "client_timeout_s": args.timeout, "checks": {}}
    proc, url = start("ours", args.weights, args, api_key=API_KEY)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=args.timeout, headers={"X-API-Key": API_KEY},
                                     limits=httpx.Limits(max_connections=args.levels[0] + 4)) as client:
            await wait_healthy(client, proc=proc)
            await level(client, bodies, 2, 3.0)  # warm-up
            for name, check in (("kill_worker", lambda: fault_kill_worker(client, bodies, proc, args)),
                                ("odd_inputs", lambda: fault_odd_inputs(client, bodies, url, args)),
                                ("sigterm", lambda: fault_sigterm(client, bodies, proc, args))):
                try:
                    report["checks"][name] = await check()
                except Exception as e:  # noqa: BLE001 - one check failing does not hide the others
                    report["checks"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                print(json.dumps({name: report["checks"][name]["ok"]}), file=sys.stderr, flush=True)
    finally:
        if proc.poll() is None:
            stop(proc)
    report["ok"] = {name: check["ok"] for name, check in report["checks"].items()}
    return report


def stop(proc: subprocess.Popen) -> dict:
    """SIGTERM to the server's whole process group; SIGKILL after 60 s. Its exit code and seconds."""
    t = time.perf_counter()
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return {"exit_code": proc.poll(), "seconds": 0.0, "killed": False}
    killed = False
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = True
    return {"exit_code": proc.returncode, "seconds": round(time.perf_counter() - t, 2), "killed": killed}


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
    ap.add_argument("--streams", type=int, default=None, help="our worker's --streams (default: its own)")
    ap.add_argument("--triton-instances", type=int, default=os.cpu_count() or 1,
                    help="Triton's model instances, each on cores / N threads (default: one per core, as our "
                         "worker's streams)")
    ap.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (s)")
    ap.add_argument("--rss-every", type=float, default=10.0, help="seconds between memory samples")
    ap.add_argument("--faults", action="store_true", help="faults under load (ours only; see the docstring)")
    ap.add_argument("--fault-warmup", type=float, default=5.0, help="seconds of load before and after each fault")
    ap.add_argument("--recover-timeout", type=float, default=180.0, help="seconds a fault may take to recover / exit")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.servers = args.servers or (["ours"] if args.soak else ["ours", *PEERS])
    if args.faults:
        report = asyncio.run(run_faults(args))
    else:
        report = asyncio.run(run(args))
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
