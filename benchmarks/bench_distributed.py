"""Distributed generation (mx.distributed): 2-rank CFG-parallel and data-parallel against 1 rank,
with full-size networks at the official configurations and random weights, plus the
arithmetic of what an interconnect of a given bandwidth gives at full size.

    # this CPU: ring backend over the loopback address, truncated depth (smoke run)
    python benchmarks/bench_distributed.py --model medium --size 128 --layers 1 --t5-tokens 16 \\
        --steps 3 --images 4 --image-steps 2 --write-docs
    # 2 GPUs of one host (issue 14): NCCL, one GPU per rank, NVLink multicast off (set for
    # every process it starts: NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1)
    python benchmarks/bench_distributed.py --backend nccl --model medium large --size 1024 \
        --docs docs/benchmarks.md --write-docs

For each model the script starts two worker runs of itself, the same code in both:
  1 rank   a plain process (CUDA_VISIBLE_DEVICES=0 under --backend nccl);
  2 ranks  `mlx.launch --backend B -n 2` on this host (NCCL_NVLS_ENABLE=0 for nccl).
Each worker builds the same random transformer (same seed), conditioning and noise, then
  steps    --steps denoising steps as the pipeline runs them (`Denoiser` + Euler), after one
           warm-up step: 1 rank runs CFG as one batch of 2 (the pipeline's default), 2 ranks
           run CFG-parallel (`distributed.CFGExchange`: one pass each, one all_gather per
           step); the step time, the collective's share (its wall time, waiting for the
           peer included) and the final latents (compared between the two runs);
  images   --images "images" of --image-steps steps each (denoising only: text encoding and
           VAE decode are the same work per image on either side), dealt round-robin over the
           ranks as the CLI deals prompts; images per minute from a barrier to a barrier, and
           each image's final latents against the 1-rank run's for the same seed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

# Interconnects for the arithmetic: (name, bytes per second in one direction).
LINKS = [
    ("Thunderbolt 5 (80 Gb/s)", 80e9 / 8),
    ("Thunderbolt 4 / USB4 (40 Gb/s)", 40e9 / 8),
    ("10 GbE", 10e9 / 8),
    ("NVLink 4 (H100 / H200: 450 GB/s per direction)", 450e9),
]
# NVLink multicast off: a program that uses it can put shared GPUs out of service.
NO_MULTICAST = ("NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1")
FULL_SIZE = 1024
STEPS = {"medium": 40, "large": 28, "sd3-medium": 28}  # the variants' default steps
SLG_STEPS = {"medium": 7}  # skip-layer guidance at its defaults (0.01-0.2 of 40 steps): one more slab


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["medium"], choices=sorted(C.MODELS))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--t5-tokens", type=int, default=256)
    p.add_argument("--layers", type=int, default=None, help="truncate the transformer (smoke runs)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(C.DTYPES))
    p.add_argument("--steps", type=int, default=6, help="timed denoising steps (after 1 warm-up step)")
    p.add_argument("--images", type=int, default=8, help="images for the data-parallel throughput")
    p.add_argument("--image-steps", type=int, default=28, help="denoising steps per image")
    p.add_argument("--backend", default="ring", choices=["ring", "nccl", "jaccl", "mpi"])
    p.add_argument("--timeout", type=float, default=900.0, help="peer timeout of the workers (s)")
    C.add_output_args(p, docs=C.REPO / "docs" / "distributed.md")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: run one side, write here
    return p.parse_args(argv)


# ---- a worker: one side of the comparison ------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    from sd35_mlx.distributed import CFGExchange, Ranks

    ranks = Ranks.init(timeout_s=args.timeout)
    out = args.worker
    _, config = C.MODELS[args.model[0]]
    dtype = C.DTYPES[args.dtype]
    model = C.random_network("transformer", C.truncated(config, args.layers), dtype, seed=0)
    positive = C.random_conditioning(1, args.t5_tokens, dtype, seed=1)
    negative = C.random_conditioning(1, args.t5_tokens, dtype, seed=2)
    side = args.size // 8

    def noise(seed: int) -> mx.array:
        return mx.random.normal((1, side, side, 16), key=mx.random.key(seed))

    # steps: 1 rank batched CFG, 2 ranks CFG-parallel
    exchange = CFGExchange(ranks) if ranks.size == 2 else None
    sigmas, sampler = C.schedule(max(28, args.steps + 1))
    den, dropped = C.make_denoiser(model, positive, negative, sigmas=sigmas, cfg_exchange=exchange)
    assert "cfg_exchange" not in dropped, "this Denoiser has no CFG-parallel mode"
    mx.eval(C.denoise_step(den, noise(0), 0, sampler))  # warm-up: compiles
    if exchange is not None:
        exchange.seconds = 0.0
    x, step_s = noise(0), []
    for i in range(args.steps):
        t0 = time.perf_counter()
        x = C.denoise_step(den, x, i, sampler)
        mx.eval(x)
        step_s.append(time.perf_counter() - t0)
    result: Dict[str, Any] = dict(size=ranks.size, step_s=step_s, exchange_s=exchange.seconds / args.steps if exchange else 0.0)
    if ranks.is_main:
        np.save(out / f"steps-{ranks.size}.npy", np.array(x))

    # images: data-parallel, denoising only
    sigmas, sampler = C.schedule(args.image_steps)
    mine = ranks.shard(list(range(args.images)))
    ranks.all_sum(mx.array([1]), "starting the images")
    t0 = time.perf_counter()
    for n, _ in mine:
        den, _ = C.make_denoiser(model, positive, negative, sigmas=sigmas)
        x = noise(100 + n)
        for i in range(args.image_steps):
            x = C.denoise_step(den, x, i, sampler)
            mx.eval(x)
        np.save(out / f"image{n}-{ranks.size}.npy", np.array(x))
    own_s = time.perf_counter() - t0
    ranks.all_sum(mx.array([1]), "finishing the images", extra_wait_s=2 * own_s)
    result.update(images_s=time.perf_counter() - t0, images=args.images)
    if ranks.is_main:
        (out / f"result-{ranks.size}.json").write_text(json.dumps(result))


# ---- the driver --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_args(args: argparse.Namespace, model: str, out: Path) -> List[str]:
    a = [str(Path(__file__).resolve()), "--worker", str(out), "--model", model, "--size", str(args.size),
         "--t5-tokens", str(args.t5_tokens), "--dtype", args.dtype, "--steps", str(args.steps),
         "--images", str(args.images), "--image-steps", str(args.image_steps), "--timeout", str(args.timeout)]  # fmt: skip
    return a + (["--layers", str(args.layers)] if args.layers else [])


def launch_command(args: argparse.Namespace, model: str, out: Path) -> List[str]:
    """The 2-rank run: mlx.launch on this host (NCCL: one GPU per rank, NVLink multicast off)."""
    from sd35_mlx.distributed import mlx_launch_command

    cmd = [*mlx_launch_command(), "--backend", args.backend, "-n", "2"]
    if args.backend == "nccl":
        cmd += ["--nccl-port", str(_free_port())] + [a for v in NO_MULTICAST for a in ("--env", v)]
    elif args.backend == "ring":
        cmd += ["--starting-port", str(_free_port())]
    return cmd + ["--", sys.executable, *_worker_args(args, model, out)]


def run_sides(args: argparse.Namespace, model: str, out: Path, log) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(C.REPO), os.environ.get("PYTHONPATH", "")]))
    if args.backend == "nccl":  # NVLink multicast stays off in every process (shared GPUs)
        env.update(v.split("=", 1) for v in NO_MULTICAST)
    single_env = dict(env, CUDA_VISIBLE_DEVICES="0") if args.backend == "nccl" else env
    for label, cmd, e in (("1 rank", [sys.executable, *_worker_args(args, model, out)], single_env),
                          ("2 ranks", launch_command(args, model, out), env)):  # fmt: skip
        log(f"  {label}: {' '.join(cmd)}")
        r = subprocess.run(cmd, env=e, capture_output=True, text=True)
        size = 1 if label == "1 rank" else 2
        if not (out / f"result-{size}.json").is_file():  # mlx.launch exits 0 whatever its ranks do
            raise SystemExit(f"{label} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    one, two = (json.loads((out / f"result-{k}.json").read_text()) for k in (1, 2))
    ref = np.load(out / "steps-1.npy")
    steps_err = float(np.abs(np.load(out / "steps-2.npy") - ref).max() / np.abs(ref).max())
    image_err, equal = 0.0, 0
    for n in range(args.images):
        a, b = np.load(out / f"image{n}-1.npy"), np.load(out / f"image{n}-2.npy")
        image_err = max(image_err, float(np.abs(a - b).max() / np.abs(a).max()))
        equal += int(np.array_equal(a, b))
    return dict(one=one, two=two, cfg_latents_rel_err=steps_err, dp_images_rel_err=image_err, dp_images_equal=equal)


def interconnect_rows(model: str) -> List[List[str]]:
    """Bytes CFG-parallel exchanges at full size (1024², fp32 velocities, one all_gather of 2)."""
    slab = (FULL_SIZE // 8) ** 2 * 16 * 4  # one velocity (1, 128, 128, 16) float32 = 1 MiB
    steps, slg = STEPS[model], SLG_STEPS.get(model, 0)
    per_image = slab * (steps + slg)  # bytes each rank sends (and receives) per image
    rows = []
    for name, bandwidth in LINKS:
        rows.append([C.MODELS[model][0], name, f"{slab / 2**20:.0f} MiB", f"{per_image / 2**20:.0f} MiB",
                     f"{slab / bandwidth * 1e3:.3f} ms", f"{per_image / bandwidth * 1e3:.1f} ms"])  # fmt: skip
    return rows


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        return worker(args)
    info = C.machine_info()
    log = print
    load_before = os.getloadavg()[0]  # other work on the same cores skews every ratio here
    t_start = time.perf_counter()
    payload: Dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    rows = []
    for model in args.model:
        log(f"{C.MODELS[model][0]} {args.size}² ({args.backend})")
        with tempfile.TemporaryDirectory() as tmp:
            r = run_sides(args, model, Path(tmp), log)
        payload["models"][model] = r
        one, two = r["one"], r["two"]
        s1, s2 = float(np.median(one["step_s"])), float(np.median(two["step_s"]))
        ipm1, ipm2 = 60 * one["images"] / one["images_s"], 60 * two["images"] / two["images_s"]
        rows.append([C.MODELS[model][0] + (f" ({args.layers} layer(s))" if args.layers else ""), f"{args.size}²",
                     C.fmt_seconds(s1), C.fmt_seconds(s2), C.fmt_ratio(s2 / s1),
                     f"{C.fmt_seconds(two['exchange_s'])} ({100 * two['exchange_s'] / s2:.0f}%)",
                     f"{r['cfg_latents_rel_err']:.1e}",
                     f"{ipm1:.2f}", f"{ipm2:.2f}", f"{ipm2 / ipm1:.2f}×",
                     f"{r['dp_images_equal']}/{args.images} (max {r['dp_images_rel_err']:.1e})"])  # fmt: skip
        log(C.markdown_table(HEADERS, rows[-1:]))
    payload["wall_s"] = time.perf_counter() - t_start
    arithmetic = [row for model in args.model for row in interconnect_rows(model)]
    body = "\n\n".join(filter(None, [
        f"_command: `{info['command']}`_",
        f"{C.versions_line(info)}",
        C.truncation_note(args.layers),
        f"Settings: {args.dtype}; T5 {args.t5_tokens} tokens; 2 ranks over `{args.backend}` on this host "
        f"against 1 process; {args.steps} timed steps after 1 warm-up; {args.images} images × "
        f"{args.image_steps} steps for the throughput. 1 rank runs CFG as one batch of 2 (the pipeline's "
        "default); the collective's time includes waiting for the peer. Load average (1 min) "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores.",
        C.markdown_table(HEADERS, rows),
        "**Exchanged by CFG-parallel at 1024²** (arithmetic, bandwidth term only: one fp32 velocity per "
        "rank and step; Medium's skip-layer-guidance steps send a second one)",
        C.markdown_table(["model", "link", "per step", "per image", "time per step", "time per image"], arithmetic),
    ]))  # fmt: skip
    C.publish(args, info, f"distributed-{args.backend}", body, payload, log)


HEADERS = ["model", "size", "step, 1 rank", "step, CFG-parallel", "ratio", "collective (share)",
           "latents Δ (rel.)", "images/min, 1 rank", "images/min, 2 ranks", "ratio", "images equal to 1 rank"]  # fmt: skip


if __name__ == "__main__":
    main()
