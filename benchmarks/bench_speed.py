"""Speed of sd35_mlx with full-size random networks, and of diffusers on the same shapes.

    python benchmarks/bench_speed.py --model medium large --size 512 1024 --bits 16 8 4 --torch --write-docs
    python benchmarks/bench_speed.py --model medium --size 256 --layers 2 --steps 2 --repeat 2   # quick CPU smoke run

Measures, in one process (so the numbers are comparable):
- seconds per denoising step, CFG batch 2, T5 at --t5-tokens (default 256: 333 text tokens),
  through `sd35_mlx.denoise.Denoiser` exactly as the pipeline runs it ("pipeline"), and
  optionally a bare `model(latents, t, context, pooled)` call, each call evaluated ("plain", --plain), for each
  --bits (16 = the --dtype, default bf16; 8 and 4 = `quantize_network` with `make_spec`);
- T5-XXL encode (batch 2, --t5-tokens tokens) for each --t5-bits; CLIP-L and CLIP-G encode
  (batch 2, 77 tokens); VAE decode at each --size (batch 1), and tiled decode where it tiles;
- with --torch (PyTorch importable): diffusers' SD3Transformer2DModel (bf16, SDPA, no_grad),
  transformers' T5EncoderModel and CLIPTextModelWithProjection, diffusers' AutoencoderKL.decode,
  built with random init directly on the device (CUDA when available, else the CPU), on the
  same shapes, and the ratios ours / theirs.
The denoising step is timed as a generation runs it: whole runs of --steps steps, synchronised
once at the end of each run (ours through `Denoiser.run`, the pipeline's loop, which builds the
next step's graph while the current one runs; diffusers' steps one after the other with no
wait between them), the step's time = run time / --steps. Warm-up runs are excluded; figures
are medians of the timed runs; MLX is synchronised with mx.eval, PyTorch with
torch.cuda.synchronize.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import mlx.core as mx  # noqa: E402

from sd35_mlx.config import CLIP_G, CLIP_L, SD3_VAE, T5_XXL  # noqa: E402

TARGET_VS_DIFFUSERS = 0.75  # eager diffusers (the last round's target)
TARGET_VS_COMPILED = 0.9  # diffusers + torch.compile (issue 12)
TARGET_QUANT_VS_16 = 1.1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["medium"], choices=sorted(C.MODELS))
    p.add_argument("--size", nargs="+", type=int, default=[512, 1024], help="image sides in pixels")
    p.add_argument("--bits", nargs="+", type=int, default=[16, 8, 4], help="transformer weights: 16 (= --dtype), 8, 4")
    p.add_argument("--t5-bits", nargs="+", type=int, default=None, help="T5 weights (default: 16 and 4)")
    p.add_argument("--t5-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="denoising steps per timed run (each step is a sample)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs (denoising: runs of --steps steps)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (compilation, caches)")
    p.add_argument("--layers", type=int, default=None, help="truncate every transformer stack (smoke runs)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(C.DTYPES))
    p.add_argument("--device", default="default", choices=["default", "cpu", "gpu"], help="MLX device")
    p.add_argument("--plain", action="store_true", help="also time a bare model(...) call per step")
    p.add_argument("--interleave", action="store_true",
                   help="denoising: build every --bits model first and alternate their timed runs (each "
                        "model's runs then follow the same others; needs all of them in memory at once; on the H200 it "
                        "slowed every 512² step: docs/performance.md)")  # fmt: skip
    p.add_argument("--only", nargs="+", default=["denoise", "t5", "clip", "vae"],
                   choices=["denoise", "t5", "clip", "vae"], help="what to measure")  # fmt: skip
    p.add_argument("--torch", action="store_true", help="also time diffusers/transformers (bf16, SDPA)")
    p.add_argument("--torch-compile", action="store_true",
                   help="also time the diffusers step under torch.compile (default mode; implies --torch; "
                        "its compile time per shape is reported separately)")  # fmt: skip
    p.add_argument("--torch-device", default=None, help="default: cuda if available, else cpu")
    C.add_output_args(p)
    args = p.parse_args(argv)
    if args.t5_bits is None:
        args.t5_bits = [16, 4]
    args.torch = args.torch or args.torch_compile
    for b in args.bits + args.t5_bits:
        if b not in (4, 8, 16):
            p.error(f"bits must be 16, 8 or 4 (got {b})")
    for s in args.size:
        if s % 16:
            p.error(f"sizes must be multiples of 16 (got {s})")
    return args


def weights_label(bits: int, dtype_name: str) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype_name] if bits >= 16 else f"{bits}-bit"


def free_memory() -> None:
    gc.collect()
    mx.clear_cache()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- MLX ----------------------------------------------------------------------------------------------
def mlx_denoise(args, model_key: str, dtype) -> List[Dict[str, Any]]:
    """One row per (weights, size): the pipeline's step; with --interleave every weights' model
    is built first and their timed runs alternate (round r times each model once)."""
    name, base_config = C.MODELS[model_key]
    config = C.truncated(base_config, args.layers)
    if args.interleave:
        return _denoise_interleaved(args, model_key, name, config, dtype)
    rows = []
    for bits in args.bits:
        model, weights = _build_transformer(args, name, config, dtype, bits)
        for size in args.size:
            row, run = _denoise_case(args, model_key, name, config, model, weights, bits, size, dtype)
            timing = C.time_per_step(run, args.steps, C.mlx_sync, args.warmup, args.repeat)
            rows.append(_timed(row, timing))
            del run
        del model
        free_memory()
    return rows


def _denoise_interleaved(args, model_key: str, name: str, config, dtype) -> List[Dict[str, Any]]:
    """Every model alive at once; per size, each warmed up, then --repeat rounds in which each
    model runs once: what ran just before a model is the same for all of them."""
    models = {bits: _build_transformer(args, name, config, dtype, bits) for bits in args.bits}
    rows = []
    for size in args.size:
        cases = [_denoise_case(args, model_key, name, config, model, weights, bits, size, dtype)
                 for bits, (model, weights) in models.items()]  # fmt: skip
        for _, run in cases:
            for _ in range(args.warmup):
                C.mlx_sync(run())
        timings = [C.Timing() for _ in cases]
        for _ in range(args.repeat):
            for (_, run), timing in zip(cases, timings):
                timing.runs += C.time_per_step(run, args.steps, C.mlx_sync, 0, 1).runs
        rows += [_timed(row, timing) for (row, _), timing in zip(cases, timings)]
        del cases
    del models
    free_memory()
    return rows


def _build_transformer(args, name: str, config, dtype, bits: int):
    """(model, its weight bytes): a random full-size transformer at these bits."""
    t0 = time.perf_counter()
    model = C.random_network("transformer", config, dtype, bits if bits < 16 else None)
    weights = C.parameter_bytes(model)
    log(f"[mlx] {name} {weights_label(bits, args.dtype)}: built in {time.perf_counter() - t0:.1f} s ({weights / C.GB:.2f} GB)")
    return model, weights


def _denoise_case(args, model_key: str, name: str, config, model, weights: int, bits: int, size: int, dtype):
    """(the row so far, a callable running --steps steps through the pipeline's Denoiser)."""
    h = w = size // 8
    noise = mx.random.normal((1, h, w, 16), key=mx.random.key(size)).astype(mx.float32)
    cond = C.random_conditioning(2, args.t5_tokens, dtype)
    negative, positive = cond[0], cond[1]
    row: Dict[str, Any] = dict(model=model_key, model_name=name, size=size, bits=bits,
                               weights=weights_label(bits, args.dtype), weight_bytes=weights,
                               depth=config.depth)  # fmt: skip
    sigmas, sampler = C.schedule(args.steps)
    if args.plain:
        _plain_matmuls(model)
        x2 = mx.concatenate([noise, noise]).astype(dtype)
        ctx, pooled = cond.context, cond.pooled

        t_plain = mx.full((2,), float(sigmas[0]) * 1000.0, dtype=mx.float32)

        def plain_call(model=model, x2=x2, t=t_plain, ctx=ctx, pooled=pooled):
            return model(x2, t, ctx, pooled)  # the velocity of the CFG batch, as one bare call

        row["plain"] = C.time_calls(plain_call, C.mlx_sync, args.warmup, args.repeat * args.steps).to_dict()
        log(f"  {size}² plain    {C.fmt_seconds(row['plain']['median_s'])} per call")
    t0 = time.perf_counter()
    # the pipeline's Denoiser; weights kept (not freed) so the model serves every size
    den, dropped = C.make_denoiser(model, positive, negative, sigmas=sigmas,
                                   free_adaln=False, free_pos_embed=False)  # fmt: skip
    row["setup_s"] = time.perf_counter() - t0
    if dropped:
        row["denoiser_options_ignored"] = dropped
    return row, lambda: C.denoise_run(den, noise, sampler, args.steps)


def _timed(row: Dict[str, Any], timing) -> Dict[str, Any]:
    row["pipeline"] = timing.to_dict()
    log(f"  {row['size']}² {row['weights']} pipeline {C.fmt_seconds(timing.median)} per step (setup {row['setup_s']:.2f} s)")
    return row


def _plain_matmuls(model) -> None:
    """Undo the Denoiser's dequantize-then-matmul swap so 'plain' is the bare quantized model."""
    try:
        from sd35_mlx.fast_quantized import use_quantized_matmul
    except ImportError:
        return
    use_quantized_matmul(model)


def mlx_t5(args, dtype) -> List[Dict[str, Any]]:
    config = C.truncated(T5_XXL, args.layers)
    ids = C.t5_ids(2, args.t5_tokens)
    rows = []
    for bits in args.t5_bits:
        model = C.random_network("t5", config, dtype, bits if bits < 16 else None)
        timing = C.time_calls(lambda model=model: model(ids), C.mlx_sync, args.warmup, args.repeat)
        rows.append(dict(stage="t5", bits=bits, weights=weights_label(bits, args.dtype),
                         shape=f"2×{args.t5_tokens} tokens", depth=config.num_layers, **timing.to_dict()))  # fmt: skip
        log(f"[mlx] T5-XXL {weights_label(bits, args.dtype)} encode: {C.fmt_seconds(timing.median)}")
        del model
        free_memory()
    return rows


def mlx_clip(args, dtype) -> List[Dict[str, Any]]:
    ids = C.clip_ids(2)
    models = {}
    rows = []
    for key, cfg in (("clip_l", CLIP_L), ("clip_g", CLIP_G)):
        cfg = C.truncated(cfg, args.layers)
        models[key] = model = C.random_network(key, cfg, dtype)
        timing = C.time_calls(lambda model=model: tuple(model(ids)), C.mlx_sync, args.warmup, args.repeat)
        rows.append(dict(stage=key, weights=weights_label(16, args.dtype), shape="2×77 tokens",
                         depth=cfg.num_layers, **timing.to_dict()))  # fmt: skip
        log(f"[mlx] {key} encode: {C.fmt_seconds(timing.median)}")
    both = C.time_calls(lambda m=models: (tuple(m["clip_l"](ids)), tuple(m["clip_g"](ids))),
                        C.mlx_sync, args.warmup, args.repeat)  # fmt: skip
    rows.append(dict(stage="clip_lg", weights=weights_label(16, args.dtype), shape="2×77 tokens", **both.to_dict()))
    log(f"[mlx] CLIP-L+G encode: {C.fmt_seconds(both.median)}")
    del models
    free_memory()
    return rows


def mlx_vae(args, dtype) -> List[Dict[str, Any]]:
    from sd35_mlx.models.vae_tiling import DEFAULT_DECODE_TILE, decode_tiled

    vae = C.random_network("vae", SD3_VAE, dtype)
    rows = []
    for size in args.size:
        z = mx.random.normal((1, size // 8, size // 8, 16), key=mx.random.key(7)).astype(dtype)
        timing = C.time_calls(lambda z=z, vae=vae: vae.decode(z), C.mlx_sync, args.warmup, args.repeat)
        rows.append(dict(stage="vae_decode", size=size, tiled=False, **timing.to_dict()))
        log(f"[mlx] VAE decode {size}²: {C.fmt_seconds(timing.median)}")
        if size // 8 > DEFAULT_DECODE_TILE:
            timing = C.time_calls(lambda z=z, vae=vae: decode_tiled(vae, z), C.mlx_sync, args.warmup, args.repeat)
            rows.append(dict(stage="vae_decode", size=size, tiled=True, **timing.to_dict()))
            log(f"[mlx] VAE decode {size}² tiled: {C.fmt_seconds(timing.median)}")
    del vae
    free_memory()
    return rows


# ---- PyTorch / diffusers ---------------------------------------------------------------------------------
def torch_denoise(args, model_key: str, device: str, compiled: bool = False) -> List[Dict[str, Any]]:
    """diffusers' step on each size; `compiled`: the transformer under `torch.compile` (default
    mode), whose first call per shape compiles (reported as compile_s, not timed). Each size is
    compiled for its own static shapes (`dynamic=False`, caches reset in between): otherwise the
    second size recompiles the graph with dynamic shapes, whose kernels are slower, and the
    baseline would be weaker than what a user compiling for one size gets."""
    import torch

    import torch_reference as R

    name, base = C.MODELS[model_key]
    model = R.transformer(C.truncated(base, args.layers), device)
    label = C.diffusers_label(compiled)
    sync = R.sync(device)
    sigmas, _ = C.schedule(args.steps)
    rows = []
    for size in args.size:
        if compiled:
            torch._dynamo.reset()
        forward = torch.compile(model, dynamic=False) if compiled else model
        with torch.no_grad():
            step, noise = diffusers_step(forward, device, size, args.t5_tokens, sigmas)
            compile_s = None
            if compiled:  # the first call compiles this shape
                sync(None)
                start = time.perf_counter()
                sync(step(noise, 0))
                compile_s = time.perf_counter() - start
                log(f"[{label}] {name} {size}²: first call (compile) {compile_s:.1f} s")

            sync(None)
            timing = C.time_per_step(lambda: C.run_steps(step, noise, args.steps), args.steps, sync, args.warmup,
                                     args.repeat)  # fmt: skip
        rows.append(dict(model=model_key, size=size, compiled=compiled, compile_s=compile_s, **timing.to_dict()))
        log(f"[{label}] {name} {size}²: {C.fmt_seconds(timing.median)} per step")
    del model, forward
    if compiled:
        torch._dynamo.reset()
    free_memory()
    return rows


def diffusers_step(forward, device: str, size: int, t5_tokens: int, sigmas):
    """(step(x, i) -> x, the initial latents): diffusers' StableDiffusion3Pipeline step on
    `forward` (a SD3Transformer2DModel, maybe compiled): batch-2 forward, CFG, Euler update."""
    import torch

    import torch_reference as R

    g = torch.Generator(device=device).manual_seed(size)
    noise = torch.randn((1, 16, size // 8, size // 8), generator=g, device=device, dtype=torch.bfloat16)
    ctx = torch.randn((2, C.CLIP_TOKENS + t5_tokens, 4096), generator=g, device=device, dtype=torch.bfloat16)
    pooled = torch.randn((2, 2048), generator=g, device=device, dtype=torch.bfloat16)

    def step(x, i):
        x2 = torch.cat([x, x])
        t = torch.full((2,), float(sigmas[i]) * 1000.0, device=device)
        v = forward(hidden_states=x2, encoder_hidden_states=ctx, pooled_projections=pooled,
                    timestep=t, return_dict=False)[0]  # fmt: skip
        return R.cfg_euler(x, v, sigmas, i, C.CFG_SCALE)

    return step, noise


def torch_t5(args, device: str) -> Dict[str, Any]:
    import torch

    import torch_reference as R

    model = R.t5(C.truncated(T5_XXL, args.layers), device)
    ids = torch.tensor(C.t5_ids(2, args.t5_tokens).tolist(), device=device)
    with torch.no_grad():
        timing = C.time_calls(lambda model=model: model(input_ids=ids)[0], R.sync(device), args.warmup, args.repeat)
    log(f"[transformers] T5-XXL encode: {C.fmt_seconds(timing.median)}")
    del model
    free_memory()
    return timing.to_dict()


def torch_clip(args, device: str) -> Dict[str, Dict[str, Any]]:
    import torch

    import torch_reference as R

    ids = torch.tensor(C.clip_ids(2).tolist(), device=device)
    out: Dict[str, Dict[str, Any]] = {}
    models = {}
    for key, c in (("clip_l", CLIP_L), ("clip_g", CLIP_G)):
        models[key] = model = R.clip(C.truncated(c, args.layers), device)
        with torch.no_grad():
            timing = C.time_calls(lambda model=model: model(ids, output_hidden_states=True), R.sync(device),
                                  args.warmup, args.repeat)  # fmt: skip
        out[key] = timing.to_dict()
        log(f"[transformers] {key} encode: {C.fmt_seconds(timing.median)}")
    with torch.no_grad():
        both = C.time_calls(
            lambda ms=models: [m(ids, output_hidden_states=True) for m in ms.values()], R.sync(device),
            args.warmup, args.repeat,
        )  # fmt: skip
    out["clip_lg"] = both.to_dict()
    del models
    free_memory()
    return out


def torch_vae(args, device: str) -> Dict[int, Dict[str, Any]]:
    import torch

    import torch_reference as R

    vae = R.vae(SD3_VAE, device)
    out = {}
    for size in args.size:
        g = torch.Generator(device=device).manual_seed(7)
        z = torch.randn((1, 16, size // 8, size // 8), generator=g, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            timing = C.time_calls(lambda z=z, vae=vae: vae.decode(z, return_dict=False)[0], R.sync(device),
                                  args.warmup, args.repeat)  # fmt: skip
        out[size] = timing.to_dict()
        log(f"[diffusers] VAE decode {size}²: {C.fmt_seconds(timing.median)}")
    del vae
    free_memory()
    return out


# ---- report ---------------------------------------------------------------------------------------------
def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def report(args, info, results) -> str:
    on_gpu = info.get("torch_device", "").startswith("cuda") and info["mlx_backend"] != "cpu"
    limit = TARGET_VS_DIFFUSERS if on_gpu else None  # the speed target is stated for the GPU
    lines = []
    if args.layers:
        lines.append(C.truncation_note(args.layers))
    lines.append(f"_{C.versions_line(info)}_  \n_command: `{info['command']}`_")
    runs = f"{args.warmup} warm-up run(s), then the median of "
    if "denoise" in args.only:
        runs += (f"{args.repeat} run(s) × {args.steps} step(s) for the denoising step (a step: the run's time / "
                 f"{args.steps}, synchronised once per run; ours through the pipeline's loop, which builds the "
                 "next step's graph while one runs)")  # fmt: skip
        if args.interleave:
            runs += "; every weights' model built first and their timed runs alternating, one of each per round"
        runs += f", of {args.repeat} run(s) for the rest" if set(args.only) - {"denoise"} else ""
    else:
        runs += f"{args.repeat} run(s)"
    shapes = ""
    if "denoise" in args.only:
        shapes += f"CFG batch 2; T5 {args.t5_tokens} tokens ({C.CLIP_TOKENS + args.t5_tokens} text tokens); "
    elif "t5" in args.only:
        shapes += f"T5 {args.t5_tokens} tokens; "
    lines.append(f"Settings: {args.dtype} weights and activations; {shapes}{runs}.")
    torch_steps = {(r["model"], r["size"]): r["median_s"] for r in results.get("diffusers_denoise", [])}
    compiled = {(r["model"], r["size"]): r for r in results.get("diffusers_compiled_denoise", [])}
    if results.get("denoise"):
        sixteen = {(r["model"], r["size"]): r["pipeline"]["median_s"] for r in results["denoise"] if r["bits"] >= 16}
        headers = ["model", "size", "weights", "s/step (pipeline)"]
        if args.plain:
            headers.append("s/step (plain call)")
        headers += ["diffusers bf16", "ours / diffusers"]
        if compiled:
            headers += ["diffusers + torch.compile", "ours / compiled"]
        headers.append("vs our 16-bit")
        rows = []
        for r in results["denoise"]:
            ours = r["pipeline"]["median_s"]
            theirs = torch_steps.get((r["model"], r["size"]))
            base16 = sixteen.get((r["model"], r["size"]))
            row = [r["model_name"], f"{r['size']}²", r["weights"], C.fmt_seconds(ours)]
            if args.plain:
                row.append(C.fmt_seconds(r.get("plain", {}).get("median_s")))
            row += [C.fmt_seconds(theirs), C.fmt_ratio(ratio(ours, theirs), limit)]
            if compiled:
                comp = compiled.get((r["model"], r["size"]), {}).get("median_s")
                row += [C.fmt_seconds(comp), C.fmt_ratio(ratio(ours, comp), TARGET_VS_COMPILED if limit else None)]
            row.append("–" if r["bits"] >= 16 else C.fmt_ratio(ratio(ours, base16), TARGET_QUANT_VS_16))
            rows.append(row)
        lines.append("**Denoising step**\n\n" + C.markdown_table(headers, rows))
        if compiled:
            spent = ", ".join(f"{C.MODELS[m][0]} {size}² {r['compile_s']:.0f} s" for (m, size), r in compiled.items())
            lines.append(f"torch.compile (default mode) first call per shape, not in the step times: {spent}. "
                         f"Targets: ours ≤ {TARGET_VS_COMPILED}× compiled diffusers (bf16), "
                         f"quantized ≤ {TARGET_QUANT_VS_16}× our bf16.")  # fmt: skip
    other = []
    t_t5 = results.get("transformers_t5")
    for r in results.get("t5", []):
        theirs = t_t5["median_s"] if t_t5 else None
        other.append(["T5-XXL encode", r["shape"], r["weights"], C.fmt_seconds(r["median_s"]),
                      C.fmt_seconds(theirs), C.fmt_ratio(ratio(r["median_s"], theirs), limit)])  # fmt: skip
    t_clip = results.get("transformers_clip", {})
    names = {"clip_l": "CLIP-L encode", "clip_g": "CLIP-G encode", "clip_lg": "CLIP-L + CLIP-G encode"}
    for r in results.get("clip", []):
        theirs = t_clip.get(r["stage"], {}).get("median_s")
        other.append([names[r["stage"]], r["shape"], r["weights"], C.fmt_seconds(r["median_s"]),
                      C.fmt_seconds(theirs), C.fmt_ratio(ratio(r["median_s"], theirs), limit)])  # fmt: skip
    t_vae = results.get("diffusers_vae", {})
    for r in results.get("vae", []):
        theirs = None if r["tiled"] else t_vae.get(r["size"], {}).get("median_s")
        other.append([f"VAE decode{' (tiled)' if r['tiled'] else ''}", f"1×{r['size']}²",
                      weights_label(16, args.dtype), C.fmt_seconds(r["median_s"]), C.fmt_seconds(theirs),
                      C.fmt_ratio(ratio(r["median_s"], theirs), limit)])  # fmt: skip
    if other:
        headers = ["stage", "shape", "weights", "ours", "diffusers / transformers bf16", "ours / theirs"]
        lines.append("**Text encoders and VAE**\n\n" + C.markdown_table(headers, other))
    if limit is None and results.get("diffusers_denoise"):
        lines.append("Ratios on the CPU are for information: the speed targets are stated for the GPU.")
    return "\n\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    C.set_device(args.device)
    dtype = C.DTYPES[args.dtype]
    torch_device = None
    if args.torch:
        try:
            import diffusers  # noqa: F401
            import torch  # noqa: F401
        except ImportError as e:
            print(f"--torch: cannot import {e.name}; timing MLX only", file=sys.stderr)
        else:
            torch_device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = C.machine_info(torch_device)
    log(f"machine: {C.machine_title(info)}\n{C.versions_line(info)}")
    if args.layers:
        log(C.truncation_note(args.layers).replace("**", ""))
    results: Dict[str, Any] = {"settings": C.settings_of(args)}
    t_start = time.perf_counter()
    if "denoise" in args.only:
        results["denoise"], results["diffusers_denoise"] = [], []
        for key in args.model:
            results["denoise"] += mlx_denoise(args, key, dtype)
            if torch_device:
                results["diffusers_denoise"] += torch_denoise(args, key, torch_device)
                if args.torch_compile:
                    results.setdefault("diffusers_compiled_denoise", [])
                    results["diffusers_compiled_denoise"] += torch_denoise(args, key, torch_device, compiled=True)
    if "t5" in args.only:
        results["t5"] = mlx_t5(args, dtype)
        if torch_device:
            results["transformers_t5"] = torch_t5(args, torch_device)
    if "clip" in args.only:
        results["clip"] = mlx_clip(args, dtype)
        if torch_device:
            results["transformers_clip"] = torch_clip(args, torch_device)
    if "vae" in args.only:
        results["vae"] = mlx_vae(args, dtype)
        if torch_device:
            results["diffusers_vae"] = torch_vae(args, torch_device)
    results["wall_s"] = time.perf_counter() - t_start

    parts = (args.model if "denoise" in args.only else []) + [s for s in ("t5", "clip", "vae") if s in args.only]
    key = "speed-" + "-".join(parts) + (f"-layers{args.layers}" if args.layers else "")
    body = report(args, info, results)
    names = {"t5": "T5-XXL", "clip": "CLIP-L/G", "vae": "VAE"}
    title = ", ".join(C.MODELS[p][0] if p in C.MODELS else names[p] for p in parts)
    body = f"### Speed: {title}\n\n{body}"
    print("\n" + body + "\n")
    C.publish(args, info, key, body, results, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
