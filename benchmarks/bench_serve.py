"""A bounded load test of `python -m sd35_mlx.serve` on the loopback address.

    python benchmarks/bench_serve.py                          # tiny random model (built here)
    python benchmarks/bench_serve.py --model PATH --size 512x512 --steps 4
    python benchmarks/bench_serve.py --write-docs             # also the machine's table in docs/serving.md

The server runs in this process (sd35_mlx.serve.background.BackgroundServer on 127.0.0.1, a free
port) with the model kept loaded. Three phases, each bounded by --requests and --duration:

1. direct: the same generation through `SD35Pipeline.generate` on the server's own worker
   thread, without HTTP: the baseline;
2. one client: requests one after another (what HTTP, JSON, base64 and the queue add);
3. --clients clients at once, against a queue of --queue-size: requests served, refused (429:
   the client waits Retry-After, capped at 1 s, and tries again while time is left), latency
   percentiles of the served ones, throughput.

Latencies are reported with their ratio to the direct median of the same run. Peak memory is
MLX's peak counter and the process's peak RSS over the whole run. Results go to
benchmarks/results/<machine>-<date>.json (key "serve"); --write-docs updates the machine's part
of docs/serving.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from statistics import median
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import mlx.core as mx  # noqa: E402

sys.path.insert(0, str(C.REPO / "tests"))  # tiny_model.py lives with the tests

from sd35_mlx.serve.background import BackgroundServer  # noqa: E402
from sd35_mlx.serve.cli import build_app, build_parser  # noqa: E402
from sd35_mlx.settings import GenerationSettings  # noqa: E402

KEY = "serve"
DOCS = C.REPO / "docs" / "serving.md"


def percentile(values: List[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def post(host: str, port: int, body: Dict[str, Any], timeout: float):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("Retry-After")
    finally:
        conn.close()


def direct_phase(app, settings: GenerationSettings, requests: int, deadline: float) -> List[float]:
    registry, worker = app.state.registry, app.state.worker
    pipe = registry.prepared(registry.default)
    times = []

    def one(seed):
        t0 = time.perf_counter()
        pipe.generate(settings=replace(settings, seed=seed))
        return time.perf_counter() - t0

    worker.call(lambda: one(0))  # warm-up: loads the networks
    for i in range(requests):
        if time.monotonic() > deadline:
            break
        times.append(worker.call(lambda: one(i + 1)))
    return times


def client_phase(server, body, clients: int, requests: int, deadline: float) -> Dict[str, Any]:
    lock = threading.Lock()
    issued = {"n": 0}
    latencies: List[float] = []
    counts = {"served": 0, "refused": 0, "failed": 0}

    def run():
        while time.monotonic() < deadline:
            with lock:
                if issued["n"] >= requests:
                    return
                issued["n"] += 1
                seed = issued["n"]
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                status, retry = post(server.host, server.port, {**body, "seed": seed}, timeout=max(1.0, deadline - time.monotonic()))
                with lock:
                    if status == 200:
                        counts["served"] += 1
                        latencies.append(time.perf_counter() - t0)
                    elif status == 429:
                        counts["refused"] += 1
                    else:
                        counts["failed"] += 1
                if status != 429:
                    break
                time.sleep(min(1.0, float(retry or 1)))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "wall_s": wall, "latencies_s": latencies, **counts,
            "throughput_per_s": counts["served"] / wall if wall else math.nan}  # fmt: skip


def summary(phase: Dict[str, Any], baseline: float) -> Dict[str, Any]:
    lat = phase["latencies_s"]
    out = {q: percentile(lat, p) for q, p in (("p50_s", 50), ("p90_s", 90), ("p99_s", 99))}
    out.update({f"{k}_ratio": v / baseline for k, v in list(out.items())})
    return out


def markdown(info, args, direct: List[float], phases: Dict[str, Dict[str, Any]], peaks) -> str:
    base = median(direct)
    rows = [["direct `SD35Pipeline.generate` (baseline)", 1, len(direct), "–", "–", C.fmt_seconds(base), "1.00×",
             "–", "–", f"{1 / base:.2f}"]]  # fmt: skip
    for name, phase in phases.items():
        s = summary(phase, base)
        rows.append([name, phase["clients"], phase["served"], phase["refused"], phase["failed"],
                     C.fmt_seconds(s["p50_s"]), C.fmt_ratio(s["p50_s_ratio"]), C.fmt_seconds(s["p90_s"]),
                     C.fmt_seconds(s["p99_s"]), f"{phase['throughput_per_s']:.2f}"])  # fmt: skip
    table = C.markdown_table(["phase", "clients", "served", "429", "failed", "p50", "p50 / direct", "p90", "p99",
                              "images/s"], rows)  # fmt: skip
    return (f"### Load test (`benchmarks/bench_serve.py`)\n\n{C.versions_line(info)}\n\n"
            f"Model: {args.model_title}; {args.size}, {args.steps} steps, queue size {args.queue_size}; "
            f"at most {args.requests} requests and {args.duration:g} s per phase.\n\n{table}\n\n"
            f"Peak memory over the run: MLX {C.fmt_gb(peaks['mlx'])}, process RSS {C.fmt_gb(peaks['rss'])}.\n")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model folder or repo id (default: a tiny random model built here)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--queue-size", type=int, default=2)
    p.add_argument("--requests", type=int, default=24, help="at most this many requests per phase")
    p.add_argument("--duration", type=float, default=60.0, help="at most this many seconds per phase")
    p.add_argument("--write-docs", action="store_true", help="update this machine's part of docs/serving.md")
    p.add_argument("--results-dir", type=Path, default=C.RESULTS_DIR)
    args = p.parse_args(argv)
    args.docs = DOCS
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 10_000 and 0 < args.duration <= 3600):
        p.error("--clients 1–64, --requests 1–10000, --duration (0, 3600] s")

    info = C.machine_info()
    scratch = Path(tempfile.mkdtemp(prefix="sd35_bench_serve_"))
    t_start = time.perf_counter()
    try:
        model = args.model
        args.model_title = model
        if model is None:
            from tiny_model import TinySpec, make_tiny_model

            model = str(scratch / "tiny")
            make_tiny_model(Path(model), TinySpec(seed=1))
            args.model_title = "tiny random test model (tests/tiny_model.py)"
        server_args = build_parser().parse_args(
            ["--model", model, "--dtype", args.dtype, "--queue-size", str(args.queue_size), "--memory-budget", "off"])
        width, height = (int(v) for v in args.size.split("x"))
        settings = GenerationSettings(prompt="a lighthouse at dusk", width=width, height=height, steps=args.steps)
        body = {"prompt": settings.prompt, "size": args.size, "steps": args.steps}
        mx.reset_peak_memory()
        app = build_app(server_args)
        with BackgroundServer(app) as server:
            direct = direct_phase(app, settings, args.requests, time.monotonic() + args.duration)
            print(f"direct: {len(direct)} generations, median {C.fmt_seconds(median(direct))}", flush=True)
            phases = {}
            for name, clients in (("one client, sequential", 1), (f"{args.clients} clients at once", args.clients)):
                phases[name] = client_phase(server, body, clients, args.requests, time.monotonic() + args.duration)
                print(f"{name}: {json.dumps({k: v for k, v in phases[name].items() if k != 'latencies_s'})}", flush=True)
        peaks = {"mlx": mx.get_peak_memory(), "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    body_md = markdown(info, args, direct, phases, peaks)
    print(body_md)
    payload = {"model": args.model_title, "size": args.size, "steps": args.steps, "queue_size": args.queue_size,
               "direct_s": direct, "phases": {k: {**v, **summary(v, median(direct))} for k, v in phases.items()},
               "peak_mlx_bytes": peaks["mlx"], "peak_rss_bytes": peaks["rss"], "wall_s": time.perf_counter() - t_start}  # fmt: skip
    C.publish(args, info, KEY, body_md, payload, print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
