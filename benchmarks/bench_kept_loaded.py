"""Consecutive generations with every network kept loaded (`low_memory=False`, what an app does).

    python benchmarks/bench_kept_loaded.py --folder /tmp/sd35-first-image/medium-converted --count 20

One process, one `SD35Pipeline.from_pretrained(folder, low_memory=False)`, then --count
generations (a different seed each, same size and steps; the stages of `generate()` run one by
one so each stage's peak is seen). For each: wall time, MLX's peak memory of each stage (`mx.reset_peak_memory()` before, `mx.get_peak_memory()` after), active memory
and MLX's buffer cache after it. Reported against the weights of every network (bytes of the
parameters, counted once all are loaded) and the planner's largest stage need above its
weights (`MemoryEstimator`, untiled decode, CFG as one batch) for the target
peak ≤ 1.1 × (weights + largest stage's own need), from the second generation on.

Results: <results-dir>/<machine-slug>-<date>.json (key kept-loaded-<model>-<size>); --write-docs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import mlx.core as mx  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
TARGET = 1.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", type=Path, required=True, help="converted or diffusers folder")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    C.add_output_args(p)
    return p.parse_args(argv)


def all_weight_bytes(pipe) -> int:
    enc = pipe._load_encoders()
    nets = [pipe._load_transformer(), pipe._load_vae()] + [getattr(enc, n) for n in ("clip_l", "clip_g", "t5")]
    return sum(C.parameter_bytes(n) for n in nets if n is not None)


def stage_need_above_weights(pipe, size: int) -> Dict[str, int]:
    """The planner's own-need terms for this configuration (activations, not weights)."""
    from sd35_mlx.memory import MemoryEstimator

    est = MemoryEstimator(pipe._load_transformer().config, trimmed_transformer=False)
    h = w = size
    needs = {
        "denoise": est.denoise(None, h, w, 256) - est._bytes("transformer", est.transformer, None),
        "decode": est.decode(h, w, tiled=False) - est._bytes("vae", est.vae, None),
    }
    return needs


def stages(pipe, i: int, args):
    """The pipeline's generate(), stage by stage, so each stage's peak is seen."""
    from sd35_mlx.settings import GenerationSettings

    s = pipe.settings_with_defaults(GenerationSettings(prompt=PROMPT, seed=i, steps=args.steps,
                                                       width=args.size, height=args.size)).with_seed()  # fmt: skip
    state: Dict[str, Any] = {}

    def encode():
        state["emb"] = pipe.encode_prompt(s.prompt, s.negative_prompt, t5_length=s.t5_length)

    def denoise():
        for info in pipe.generate_latents(s, embeddings=state["emb"]):
            state["latents"] = info.latents

    def decode():
        mx.eval(pipe.decode(state["latents"]))

    return [("encode", encode), ("denoise", denoise), ("decode", decode)]


def main(argv=None) -> int:
    args = parse_args(argv)
    from sd35_mlx.pipeline import SD35Pipeline

    t_start = time.perf_counter()
    info = C.machine_info()
    pipe = SD35Pipeline.from_pretrained(str(args.folder), low_memory=False)
    gens = []
    weights = None
    for i in range(args.count):
        g: Dict[str, Any] = dict(index=i + 1, stages={})
        t0 = time.perf_counter()
        mx.reset_peak_memory()
        for stage, run in stages(pipe, i, args):
            before = mx.get_active_memory()
            mx.reset_peak_memory()
            run()
            g["stages"][stage] = dict(before_bytes=before, peak_bytes=mx.get_peak_memory())
        g["wall_s"] = time.perf_counter() - t0
        g["peak_bytes"] = max(st["peak_bytes"] for st in g["stages"].values())
        g.update(active_bytes=mx.get_active_memory(), cache_bytes=mx.get_cache_memory())
        if weights is None:
            weights = all_weight_bytes(pipe)
        gens.append(g)
        per = ", ".join(f"{k} {v['peak_bytes'] / C.GB:.2f}" for k, v in g["stages"].items())
        print(f"generation {i + 1}: {g['wall_s']:.2f} s, peak {g['peak_bytes'] / C.GB:.2f} GB ({per}), active "
              f"{g['active_bytes'] / C.GB:.2f} GB, cache {g['cache_bytes'] / C.GB:.2f} GB", flush=True)  # fmt: skip
    try:
        needs = stage_need_above_weights(pipe, args.size)
    except Exception as e:  # the estimator's API is the planner's; the series stands without it
        print(f"(no planner estimate: {e})", flush=True)
        needs = {}
    bound = TARGET * (weights + max(needs.values())) if needs else None
    res: Dict[str, Any] = dict(settings={k: str(v) for k, v in vars(args).items()}, generations=gens,
                               weight_bytes=weights, stage_need_bytes=needs, bound_bytes=bound,
                               cache_limit_bytes=_cache_limit())  # fmt: skip
    res["wall_s"] = time.perf_counter() - t_start
    later = [g["peak_bytes"] for g in gens[1:]] or [gens[0]["peak_bytes"]]
    rows = [[g["index"], f"{g['wall_s']:.2f} s", C.fmt_gb(g["peak_bytes"]), C.fmt_gb(g["active_bytes"]),
             C.fmt_gb(g["cache_bytes"])] for g in gens]  # fmt: skip
    verdict = "–" if bound is None else ("✓" if max(later) <= bound else "✗")
    body = "\n\n".join([
        f"### Kept loaded: {args.count} consecutive generations, {args.size}², {args.steps} steps, `low_memory=False`",
        f"_{C.versions_line(info)}_  \n_command: `{info['command']}`_",
        f"One process, one pipeline, a new seed each time. Weights of all networks {C.fmt_gb(weights)}; the "
        f"planner's largest own need above the weights "
        + (f"{C.fmt_gb(max(needs.values()))} ({max(needs, key=needs.get)})" if needs else "–")
        + f"; target: peak from the second generation on ≤ {TARGET} × (weights + that) = "
        f"{C.fmt_gb(bound)}: max {C.fmt_gb(max(later))} {verdict}; growth from generation 2 to {args.count}: "
        f"{C.fmt_gb(later[-1] - later[0])}.",
        C.markdown_table(["generation", "time", "peak", "active after", "MLX cache after"], rows),
    ])  # fmt: skip
    print("\n" + body + "\n")
    C.publish(args, info, f"kept-loaded-{args.size}", body, res, print)
    return 0


def _cache_limit():
    try:
        from sd35_mlx.memory import kept_loaded_cache_limit  # the policy, where it exists

        return kept_loaded_cache_limit()
    except ImportError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
