"""Ours against diffusers run for run: ratios of adjacent runs, robust to a host that drifts.

    python benchmarks/bench_paired.py --model medium large --size 512 --bits 16 4 --torch-compile --write-docs
    python benchmarks/bench_paired.py --model medium --size 64 --layers 1 --steps 2 --rounds 2 --torch   # CPU smoke run

At 512² both sides' steps are bound by the host's speed, and on the lent H200 (a KVM guest)
that speed drifts: one process's Medium 512² step took 10.8, 12.6 and 14.4 ms in three
consecutive 28-step runs (session 10 logs). Timed one after the other, in blocks, the two sides
see different hosts and their ratio carries the drift. Here every runner (ours at each --bits,
diffusers eager and/or compiled) is built first and kept; each round runs every runner once for
--steps steps (the order rotating from round to round), and each round gives its own ratios:
our runs against the strongest diffusers runner (compiled, else eager) and our quantized runs
against our bf16 run. Reported: the median step of each runner, and the median and range of
the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import mlx.core as mx  # noqa: E402
from bench_run_length import mlx_runner, torch_runner  # noqa: E402
from bench_speed import free_memory, log, weights_label  # noqa: E402

KEY = "paired"


@dataclass
class Runner:
    label: str
    run: Callable[[int], Any]  # n steps, not yet waited for
    sync: Callable[[Any], None]
    bits: Optional[int] = None  # ours: 16, 8, 4
    diffusers: Optional[str] = None  # "eager" / "compiled"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["medium"], choices=sorted(C.MODELS))
    p.add_argument("--size", nargs="+", type=int, default=[512])
    p.add_argument("--bits", nargs="+", type=int, default=[16], help="our transformer's weights: 16 (bf16), 8, 4")
    p.add_argument("--steps", type=int, default=28, help="steps per timed run")
    p.add_argument("--rounds", type=int, default=12, help="timed rounds (each runs every runner once)")
    p.add_argument("--settle", type=int, default=0,
                   help="untimed runs of a runner just before its timed run (0: timed right after the previous runner)")
    p.add_argument("--t5-tokens", type=int, default=256)
    p.add_argument("--layers", type=int, default=None, help="truncate the transformer (smoke runs)")
    C.add_diffusers_args(p)
    C.add_output_args(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.settle < 0:
        p.error("--steps and --rounds must be at least 1, --settle at least 0")
    C.check_bits_and_sizes(p, args)
    if not (args.torch or args.torch_compile) and len(args.bits) < 2:
        p.error("nothing to pair: add --torch / --torch-compile, or a second --bits")
    args.bits = sorted(set(args.bits), reverse=True)  # bf16 first: the quantized runs' reference
    return args


def run_rounds(runners: Sequence[Runner], steps: int, rounds: int, settle: int = 0) -> List[Dict[str, float]]:
    """Per round, each runner's seconds per step; one untimed warm-up round first (it compiles).
    Round r starts at runner r mod len(runners), so no runner always follows the same one;
    `settle` untimed runs of a runner precede its timed one (what switching costs, left out)."""
    out: List[Dict[str, float]] = []
    k = len(runners)
    for r in range(rounds + 1):
        times: Dict[str, float] = {}
        for j in range(k):
            runner = runners[(r + j) % k]
            for _ in range(settle):
                runner.sync(runner.run(steps))
            start = time.perf_counter()
            runner.sync(runner.run(steps))
            times[runner.label] = (time.perf_counter() - start) / steps
        if r:
            out.append(times)
    return out


def pairings(runners: Sequence[Runner]) -> List[tuple]:
    """(runner, reference) pairs: every ours against the strongest diffusers runner (compiled,
    else eager), every quantized ours against our bf16."""
    best = C.strongest_baseline(runners, lambda r: r.diffusers)
    bf16 = next((r for r in runners if r.bits == 16), None)
    pairs = []
    for r in runners:
        if r.bits is None:
            continue
        if best is not None:
            pairs.append((r, best))
        if bf16 is not None and r.bits != 16:
            pairs.append((r, bf16))
    return pairs


def summarise(runners: Sequence[Runner], rounds: List[Dict[str, float]]) -> Dict[str, Any]:
    steps = {r.label: statistics.median(t[r.label] for t in rounds) for r in runners}
    ratios = {}
    for r, ref in pairings(runners):
        per_round = [t[r.label] / t[ref.label] for t in rounds]
        ratios[f"{r.label} / {ref.label}"] = {"median": statistics.median(per_round), "min": min(per_round),
                                               "max": max(per_round), "rounds": per_round}  # fmt: skip
    return {"step_s": steps, "ratios": ratios}


def case_table(name: str, size: int, summary: Dict[str, Any]) -> str:
    rows = [[name, f"{size}²", label, f"{1000 * s:.2f}"] for label, s in summary["step_s"].items()]
    ratio_rows = [[name, f"{size}²", pair, f"**{v['median']:.3f}×** ({v['min']:.2f}–{v['max']:.2f})"]
                  for pair, v in summary["ratios"].items()]  # fmt: skip
    return C.markdown_table(["model", "size", "runner", "median ms/step"], rows) + "\n\n" + C.markdown_table(
        ["model", "size", "pair (same round)", "median ratio (range over rounds)"], ratio_rows
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    torch_device = C.baseline_device(args.torch or args.torch_compile, args.torch_device)
    info = C.announce(torch_device, log)
    t_start = time.perf_counter()
    cases, tables = [], []
    for key in args.model:
        name, config = C.MODELS[key]
        config = C.truncated(config, args.layers)
        models = {bits: C.random_network("transformer", config, mx.bfloat16, None if bits == 16 else bits) for bits in args.bits}
        for size in args.size:
            with ExitStack() as stack:
                runners = [Runner(f"sd35_mlx {weights_label(bits, 'bfloat16')}", mlx_runner(size, m, args.steps, args.t5_tokens),
                                  C.mlx_sync, bits=bits) for bits, m in models.items()]  # fmt: skip
                for compiled, mode, label in C.diffusers_runs(args):
                    run, sync = stack.enter_context(
                        torch_runner(key, args.layers, size, torch_device, compiled, args.steps, args.t5_tokens))
                    runners.append(Runner(label, run, sync, diffusers=mode))
                summary = summarise(runners, run_rounds(runners, args.steps, args.rounds, args.settle))
            for pair, v in summary["ratios"].items():
                log(f"{name} {size}²: {pair} median {v['median']:.3f}× ({v['min']:.2f}–{v['max']:.2f})")
            cases.append(dict(model=key, size=size, **summary))
            tables.append(case_table(name, size, summary))
        del models
        free_memory()
    body = "\n\n".join([
        "### Paired runs: ours and diffusers in alternation (`bench_paired.py`)\n\n"
        f"{C.versions_line(info)}. {C.truncation_note(args.layers)}\n\n"
        f"Every runner built first; {args.rounds} rounds, each running every runner once for {args.steps} steps "
        f"(CFG batch 2, {C.CLIP_TOKENS + args.t5_tokens} text tokens; the order rotating"
        + (f"; {args.settle} untimed run(s) of a runner just before its timed one" if args.settle else "")
        + "), after a warm-up round. "
        "A ratio is taken within each round, so a host that drifts between rounds moves both of its runs.",
        *tables,
    ])  # fmt: skip
    payload = {"settings": C.settings_of(args),
               "cases": cases, "wall_s": time.perf_counter() - t_start}  # fmt: skip
    C.publish(args, info, KEY, body, payload, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
