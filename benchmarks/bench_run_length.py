"""What a denoising run costs once and what each further step costs, ours and diffusers'.

    python benchmarks/bench_run_length.py --model large medium --size 512 --bits 16 4 --torch-compile --write-docs
    python benchmarks/bench_run_length.py --model medium --size 256 --layers 1 --run-lengths 1 2 --repeat 1   # CPU smoke run

bench_speed.py reports a step as (run time / steps) of one run length: that figure carries a
share of what every run pays once (building and queueing the first step before the device
has work, the last wait), and the share shrinks as runs get longer. Here whole runs of each
--run-lengths n are timed (synchronised once at the end, ours through `Denoiser.run` as the
pipeline runs it, diffusers' steps one after the other), alternating the run lengths so each
is timed in the same conditions, and a least-squares line wall(n) = fixed + n × step splits
them: `fixed` is the once-per-run cost, `step` the cost of one more step. Both sides are
measured in one process on the same device; the ratios compare them at every run length.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import mlx.core as mx  # noqa: E402
from bench_speed import diffusers_step, free_memory, log, weights_label  # noqa: E402

KEY = "run-length"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["large"], choices=sorted(C.MODELS))
    p.add_argument("--size", nargs="+", type=int, default=[512])
    p.add_argument("--bits", nargs="+", type=int, default=[16], help="our transformer's weights: 16 (bf16), 8, 4")
    p.add_argument("--run-lengths", nargs="+", type=int, default=[2, 6, 28], help="steps per timed run")
    p.add_argument("--t5-tokens", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5, help="timed rounds (each times every run length once)")
    p.add_argument("--layers", type=int, default=None, help="truncate the transformer (smoke runs)")
    C.add_diffusers_args(p)
    C.add_output_args(p)
    args = p.parse_args(argv)
    if len(set(args.run_lengths)) < 2 or min(args.run_lengths) < 1:
        p.error("--run-lengths needs at least two different step counts, each at least 1")
    C.check_bits_and_sizes(p, args)
    args.run_lengths = sorted(set(args.run_lengths))
    return args


def fit(walls: Dict[int, float]) -> Tuple[float, float]:
    """(fixed seconds, seconds per step): the least-squares line through (n, wall(n))."""
    ns = list(walls)
    mean_n = sum(ns) / len(ns)
    mean_w = sum(walls.values()) / len(ns)
    step = sum((n - mean_n) * (walls[n] - mean_w) for n in ns) / sum((n - mean_n) ** 2 for n in ns)
    return mean_w - step * mean_n, step


def time_run_lengths(run: Callable[[int], Any], sync: Callable[[Any], None], lengths: Sequence[int], repeat: int) -> Dict[str, Any]:
    """Median wall of run(n) per run length (one warm-up round, then `repeat` rounds that each
    time every length once) and the fitted fixed / per-step costs."""
    runs: Dict[int, List[float]] = {n: [] for n in lengths}
    for r in range(repeat + 1):
        for n in lengths:
            start = time.perf_counter()
            sync(run(n))
            if r:
                runs[n].append(time.perf_counter() - start)
    walls = {n: statistics.median(v) for n, v in runs.items()}
    fixed, step = fit(walls)
    return {"wall_s": walls, "per_step_s": {n: w / n for n, w in walls.items()}, "fixed_s": fixed, "step_s": step,
            "runs_s": runs}  # fmt: skip


def mlx_runner(size: int, model, steps: int, t5_tokens: int) -> Callable[[int], mx.array]:
    """run(n): the first n steps of one Denoiser on a `steps`-step schedule, through
    `Denoiser.run` as the pipeline runs it (a fresh sampler per run; not evaluated)."""
    noise = mx.random.normal((1, size // 8, size // 8, 16), key=mx.random.key(size)).astype(mx.float32)
    cond = C.random_conditioning(2, t5_tokens, mx.bfloat16)
    sigmas, _ = C.schedule(steps)
    den, _ = C.make_denoiser(model, cond[1], cond[0], sigmas=sigmas, free_adaln=False, free_pos_embed=False)
    return lambda n: C.denoise_run(den, noise, C.schedule(steps)[1], n)


def mlx_case(args, size: int, model) -> Dict[str, Any]:
    """Our runs on the longest schedule, every run length timed."""
    run = mlx_runner(size, model, max(args.run_lengths), args.t5_tokens)
    return time_run_lengths(run, C.mlx_sync, args.run_lengths, args.repeat)


@contextmanager
def torch_runner(model_key: str, layers: Optional[int], size: int, device: str, compiled: bool, steps: int,
                 t5_tokens: int) -> Iterator[Tuple[Callable[[int], Any], Callable[[Any], None]]]:  # fmt: skip
    """(run(n), sync): n of diffusers' steps on a `steps`-step schedule (eager, or under
    torch.compile: its first run compiles), under no_grad; the model is freed on exit."""
    import torch

    import torch_reference as R

    model = R.transformer(C.truncated(C.MODELS[model_key][1], layers), device)
    if compiled:
        torch._dynamo.reset()
    forward = torch.compile(model, dynamic=False) if compiled else model
    sigmas, _ = C.schedule(steps)
    try:
        with torch.no_grad():
            step, noise = diffusers_step(forward, device, size, t5_tokens, sigmas)
            yield (lambda n: C.run_steps(step, noise, n)), R.sync(device)
    finally:
        del model, forward
        if compiled:
            torch._dynamo.reset()
        free_memory()


def torch_case(args, model_key: str, size: int, device: str, compiled: bool) -> Dict[str, Any]:
    with torch_runner(model_key, args.layers, size, device, compiled, max(args.run_lengths), args.t5_tokens) as (run, sync):
        return time_run_lengths(run, sync, args.run_lengths, args.repeat)


def ms_with_ratio(seconds: float, baseline_seconds: Optional[float]) -> str:
    """Milliseconds, and the ratio to the baseline's where there is one."""
    return f"{1000 * seconds:.2f}" + (f" ({seconds / baseline_seconds:.2f}×)" if baseline_seconds is not None else "")


def table(rows: List[Dict[str, Any]], lengths: Sequence[int]) -> str:
    """One row per (model, size, runner): ms per step at each run length, fixed + per-step
    fit, and the ratios to the strongest baseline measured (compiled, else eager)."""
    headers = ["model", "size", "runner"] + [f"{n} steps: ms/step" for n in lengths] + ["fixed ms", "per step ms"]
    out = []
    for r in rows:
        base = r["baseline"]
        cells = [ms_with_ratio(r["per_step_s"][n], base and base["per_step_s"][n]) for n in lengths]
        step = ms_with_ratio(r["step_s"], base and base["step_s"])
        out.append([r["model_name"], f"{r['size']}²", r["runner"], *cells, f"{1000 * r['fixed_s']:.1f}", step])
    return C.markdown_table(headers, out)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch_device = C.baseline_device(args.torch or args.torch_compile, args.torch_device)
    info = C.announce(torch_device, log)
    lengths = args.run_lengths
    t_start = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    for key in args.model:
        name, config = C.MODELS[key]
        config = C.truncated(config, args.layers)
        group: List[Dict[str, Any]] = []
        for bits in args.bits:
            model = C.random_network("transformer", config, mx.bfloat16, None if bits == 16 else bits)
            for size in args.size:
                r = mlx_case(args, size, model)
                group.append(dict(model=key, model_name=name, size=size, runner=f"sd35_mlx {weights_label(bits, 'bfloat16')}",
                                  diffusers=None, **r))  # fmt: skip
                log(f"[mlx] {name} {weights_label(bits, 'bfloat16')} {size}²: fixed {1000 * r['fixed_s']:.1f} ms + {1000 * r['step_s']:.2f} ms/step")
            del model
            free_memory()
        for compiled, mode, label in C.diffusers_runs(args):
            for size in args.size:
                r = torch_case(args, key, size, torch_device, compiled)
                group.append(dict(model=key, model_name=name, size=size, runner=label, diffusers=mode, **r))
                log(f"[{label}] {name} {size}²: fixed {1000 * r['fixed_s']:.1f} ms + {1000 * r['step_s']:.2f} ms/step")
        for r in group:  # the strongest baseline of the same size
            best = C.strongest_baseline([b for b in group if b["size"] == r["size"]], lambda b: b["diffusers"])
            r["baseline"] = best if best is not r else None  # the baseline itself gets no ratio
        rows += group
    body = "\n\n".join([
        f"### Run length: the once-per-run cost and the cost of a step (`bench_run_length.py`)\n\n"
        f"{C.versions_line(info)}. {C.truncation_note(args.layers)}\n\n"
        f"Whole runs of n steps (CFG batch 2, {C.CLIP_TOKENS + args.t5_tokens} text tokens), timed alternately; `fixed` and `per step` are the "
        "least-squares line wall(n) = fixed + n × per step. Ratios are against diffusers + torch.compile "
        "(else eager) at the same size and run length.",
        table(rows, lengths),
    ])  # fmt: skip
    payload = {"settings": C.settings_of(args),
               "rows": [{k: v for k, v in r.items() if k != "baseline"} for r in rows],
               "wall_s": time.perf_counter() - t_start}  # fmt: skip
    C.publish(args, info, KEY, body, payload, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
