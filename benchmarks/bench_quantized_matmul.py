"""How fast is a quantized transformer step, and which matmul should quantized layers use?

    python benchmarks/bench_quantized_matmul.py                  # backend defaults (see below)
    python benchmarks/bench_quantized_matmul.py --config large --depth 8 --size 1024
    python benchmarks/bench_quantized_matmul.py --layers-only    # just the per-layer table

Two tables, both with ratios against the 16-bit number of the same run:
1. one Linear layer of the model's width at several row counts (tokens × batch):
   16-bit `addmm` vs `quantized_matmul` vs `dequantize` + `addmm`, at 4 and 8 bits — where
   the crossover lies sets `sd35_mlx.fast_quantized.DEFAULT_MIN_ROWS`;
2. one denoising step (CFG batch of 2, Euler update) of an MMDiT with random weights:
   the plain call (conditioning recomputed each step, uncompiled) vs the fast Denoiser
   (precomputed adaLN table, compiled) at 16-bit, and quantized with each matmul choice.
   "step peak" is the memory the step adds above the resident weights.

Defaults: on a GPU, SD3.5 Medium at full depth, 1024², 333 text tokens (well under a
minute on an H100); on the CPU, where MLX's matmuls are slow, a narrow shallow model.
Random weights: timings only, the images would be noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402
import mlx.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sd35_mlx.conditioning import Conditioning  # noqa: E402
from sd35_mlx.config import SD3_MEDIUM_MMDIT, SD35_LARGE_MMDIT, SD35_MEDIUM_MMDIT, MMDiTConfig  # noqa: E402
from sd35_mlx.denoise import Denoiser  # noqa: E402
from sd35_mlx.backend import backend_name  # noqa: E402
from sd35_mlx.fast_quantized import default_min_rows, use_dequantized_matmul  # noqa: E402
from sd35_mlx.models.mmdit import MMDiT  # noqa: E402
from sd35_mlx.quantize import make_spec, quantize_network  # noqa: E402
from sd35_mlx.sampling import flow_sigmas, make_sampler  # noqa: E402

CONFIGS = {"medium": SD35_MEDIUM_MMDIT, "large": SD35_LARGE_MMDIT, "sd3-medium": SD3_MEDIUM_MMDIT}
GB = 1e9


def timed(fn: Callable[[], mx.array], reps: int, warmup: int = 1) -> float:
    """Median seconds of `fn` (evaluated each time) after `warmup` runs."""
    return C.time_calls(fn, C.mlx_sync, warmup, reps).median


# ---- 1. one layer ----
def bench_layers(hidden: int, rows: List[int], bits_list: List[int], dtype: mx.Dtype, reps: int) -> List[dict]:
    out = []
    for k, n, name in ((hidden, 4 * hidden, "fc1 H->4H"), (4 * hidden, hidden, "fc2 4H->H")):
        w = (mx.random.normal((n, k)) / k**0.5).astype(dtype)
        bias = mx.zeros((n,), dtype=dtype)
        quantized = {b: mx.quantize(w, 64, b) for b in bits_list}
        mx.eval(w, bias, quantized)
        for m in rows:
            x = mx.random.normal((m, k)).astype(dtype)
            mx.eval(x)
            row = {"layer": name, "rows": m, "16-bit ms": 1e3 * timed(lambda: mx.addmm(bias, x, w.T), reps)}
            for b, (wq, s, bq) in quantized.items():
                qmm = timed(lambda: mx.quantized_matmul(x, wq, s, bq, transpose=True, group_size=64, bits=b) + bias, reps)
                deq = timed(lambda: mx.addmm(bias, x, mx.dequantize(wq, s, bq, 64, b).T), reps)
                row[f"q{b} qmm ms"], row[f"q{b} deq ms"] = 1e3 * qmm, 1e3 * deq
            out.append(row)
    return out


# ---- 2. one step ----
def build(config: MMDiTConfig, dtype: mx.Dtype, bits: int = 0, seed: int = 0) -> MMDiT:
    mx.random.seed(seed)
    model = MMDiT(config)
    model.set_dtype(dtype)
    if bits:
        quantize_network(model, make_spec("transformer", bits=bits), "transformer")
    mx.eval(model.parameters())
    return model


def weight_bytes(model: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


def bench_step(args, config: MMDiTConfig, dtype: mx.Dtype) -> List[dict]:
    side = args.size // 8
    k = mx.random.split(mx.random.key(1), 4)
    pos = Conditioning(mx.random.normal((1, args.context_tokens, config.context_dim), key=k[0]).astype(dtype),
                       mx.random.normal((1, config.pooled_dim), key=k[1]).astype(dtype))  # fmt: skip
    neg = Conditioning(mx.random.normal((1, args.context_tokens, config.context_dim), key=k[2]).astype(dtype),
                       mx.random.normal((1, config.pooled_dim), key=k[3]).astype(dtype))  # fmt: skip
    latents = mx.random.normal((1, side, side, config.in_channels), key=mx.random.key(2))
    steps = args.reps + 1
    sigmas = flow_sigmas(steps, 3.0)
    both = Conditioning.concat([neg, pos])

    def plain_loop(model: MMDiT) -> Callable[[], mx.array]:
        sampler = make_sampler("euler", sigmas)
        state = {"i": 0}

        def step():
            i = state["i"] % steps
            state["i"] += 1
            t = mx.full((2,), sigmas[i] * 1000.0, dtype=mx.float32)
            x = latents.astype(dtype)
            out = model(mx.concatenate([x, x]), t, both.context, both.pooled).astype(mx.float32)
            vu, vc = mx.split(out, 2, axis=0)
            return sampler.step(i, latents, vu + 4.5 * (vc - vu))

        return step

    def fast_loop(model: MMDiT, min_rows=None, **kw) -> Callable[[], mx.array]:
        use_dequantized_matmul(model, min_rows)  # no-op for a 16-bit model
        den = Denoiser(model, pos, neg, cfg=4.5, skip_layer_guidance=None, num_steps=steps, sigmas=sigmas,
                       free_adaln=True, free_pos_embed=True, **kw)  # fmt: skip
        sampler = make_sampler("euler", sigmas)
        state = {"i": 0}

        def step():
            i = state["i"] % steps
            state["i"] += 1
            return den.step(latents, i, sampler)

        return step

    modes = [("16-bit plain call, uncompiled", 0, "plain", {}),
             ("16-bit fast, uncompiled", 0, "fast", {"compile": False}),
             ("16-bit fast (table + compile)", 0, "fast", {})]  # fmt: skip
    for b in args.bits:
        modes += [(f"{b}-bit quantized_matmul", b, "fast", {"min_rows": 1 << 62}),
                  (f"{b}-bit dequantize+matmul", b, "fast", {"min_rows": 1})]  # fmt: skip
    rows = []
    for label, bits, kind, kw in modes:
        model = build(config, dtype, bits)
        resident = weight_bytes(model)
        t0 = time.perf_counter()
        fn = plain_loop(model) if kind == "plain" else fast_loop(model, **kw)
        setup = time.perf_counter() - t0  # the adaLN table and text embedding
        t0 = time.perf_counter()
        mx.eval(fn())  # warm-up (and compile)
        first = time.perf_counter() - t0
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        seconds = timed(fn, args.reps, warmup=0)
        peak = mx.get_peak_memory() - base
        rows.append({"mode": label, "step ms": 1e3 * seconds, "setup ms": 1e3 * setup, "first step ms": 1e3 * first,
                     "weights GB": weight_bytes(model) / GB,
                     "weights before GB": resident / GB, "step peak GB": peak / GB})  # fmt: skip
        del fn, model
        mx.clear_cache()
    return rows


def markdown(rows: List[dict], ratio_of: Dict[str, str]) -> str:
    """A table; for each (column -> reference column) also the ratio column/reference."""
    cols = list(rows[0])
    head = cols + [f"{c} / {r}" for c, r in ratio_of.items()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        cells += [f"{row[c] / row[r]:.2f}×" for c, r in ratio_of.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    on_gpu = mx.default_device().type == mx.gpu
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(CONFIGS), default="medium")
    p.add_argument("--depth", type=int, default=None, help="blocks (default: all on GPU, 1 on CPU)")
    p.add_argument("--hidden", type=int, default=None, help="width, 64 per head (default: the config's on GPU, 256 on CPU)")
    p.add_argument("--size", type=int, default=1024 if on_gpu else 256, help="image side in pixels")
    p.add_argument("--context-tokens", type=int, default=333 if on_gpu else 77)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--reps", type=int, default=5 if on_gpu else 2)
    p.add_argument("--rows", type=int, nargs="+", default=None, help="row counts for the layer table")
    p.add_argument("--layers-only", action="store_true")
    p.add_argument("--steps-only", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    config = CONFIGS[args.config]
    hidden = args.hidden or (config.hidden_size if on_gpu else 256)
    depth = args.depth or (config.depth if on_gpu else 1)
    config = replace(config, hidden_size=hidden, num_heads=hidden // 64, depth=depth,
                     dual_attention_layers=tuple(i for i in config.dual_attention_layers if i < depth - 1))  # fmt: skip
    dtype = getattr(mx, args.dtype)
    rows = args.rows or ([64, 256, 1024, 4096, 8192] if on_gpu else [16, 64, 256])
    device = f"{mx.default_device()} ({mx.device_info().get('device_name', '?')}), MLX {mx.__version__}"
    print(f"# {device}; {args.dtype}; backend {backend_name()}, default_min_rows={default_min_rows()}\n")
    result = {"device": device, "dtype": args.dtype}
    t0 = time.perf_counter()
    if not args.steps_only:
        layers = bench_layers(hidden, rows, args.bits, dtype, args.reps)
        ratios = {f"q{b} {kind} ms": "16-bit ms" for b in args.bits for kind in ("qmm", "deq")}
        print(f"## one Linear, width {hidden}\n\n" + markdown(layers, ratios) + "\n")
        result["layers"] = layers
    if not args.layers_only:
        steps = bench_step(args, config, dtype)
        ref = next(r for r in steps if r["mode"] == "16-bit fast (table + compile)")
        for r in steps:
            r["vs 16-bit fast"] = r["step ms"] / ref["step ms"]
        print(f"## one step: {args.config} width {hidden} depth {depth}, {args.size}², "
              f"{args.context_tokens} text tokens, CFG batch 2\n\n" + markdown(steps, {}) + "\n")  # fmt: skip
        result["steps"] = steps
    print(f"total {time.perf_counter() - t0:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
