"""Cost of runtime LoRAs: a denoising step with 0, 1 and 3 LoRAs, at 16-bit and 4-bit, and the
memory each LoRA adds.

    python benchmarks/bench_lora.py --model medium large --size 1024 --bits 16 4 --diffusers-fused --write-docs
    python benchmarks/bench_lora.py --model medium --size 128 --layers 1 --steps 1 --repeat 2 --device cpu  # CPU smoke run

Full-size random networks (benchmarks/common.py), CFG batch 2, T5 at 256 tokens, the step as
the pipeline runs it (`sd35_mlx.denoise.Denoiser`, compiled; quantized layers de-quantize
before large matmuls). Each LoRA is random, rank --rank, on every Linear of every joint block
(kohya's default set: both streams' qkv, proj, MLP; the adaLN modulations are computed once per
generation and are left out), the qkv as three diffusers-style q / k / v parts. The configurations
are timed in turn, round by round (--repeat rounds; each a warm-up run, then one timed run of
--steps steps through the pipeline's loop, `Denoiser.run`, synchronised at its end); figures are medians over the rounds, ratios against the step without LoRA of the same
process. Memory: MLX active memory after attaching a LoRA, minus before.

The LoRAs are written as diffusers / PEFT files (`transformer.<module>.lora_A/B.weight`) and
loaded the way a user loads them (`read_lora` + `prepare` + `attach_lora`). With --diffusers (on
when torch + diffusers + peft import): the same files on diffusers' SD3Transformer2DModel (bf16,
SDPA, random init, torch_reference.py) through its PEFT integration (`load_lora_adapter` +
`set_adapters`, unfused, as diffusers runs a LoRA at runtime; --diffusers-fused also times
`fuse_lora`), timed in the same process on --torch-device (cuda when available, else cpu): the
step without LoRA on the model before any adapter is loaded, then the LoRA counts round by round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from sd35_mlx.adapters import lora as runtime  # noqa: E402
from sd35_mlx.adapters.apply import attach_lora, prepare  # noqa: E402
from sd35_mlx.adapters.source import read_lora  # noqa: E402
from sd35_mlx.adapters.targets import TABLES, _our_names, layer_dims, module_targets  # noqa: E402

TARGET_ONE_LORA = 1.05  # the goal for one rank-16 LoRA
CPU_NOTE = ("**On a CPU the ratios are not speed evidence**, least of all ours / diffusers: MLX and PyTorch use "
            "different CPU kernels, and a shared machine's load swings more between rounds than a LoRA costs. "
            "They show that the baseline runs; speed figures come from a GPU run.")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["medium"], choices=sorted(C.MODELS))
    p.add_argument("--size", nargs="+", type=int, default=[1024], help="image sides in pixels")
    p.add_argument("--bits", nargs="+", type=int, default=[16, 4], help="transformer weights: 16 (= --dtype), 8, 4")
    p.add_argument("--loras", nargs="+", type=int, default=[0, 1, 3], help="numbers of LoRAs to time")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="truncate the transformer (smoke runs)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(C.DTYPES))
    p.add_argument("--device", default="default", choices=["default", "cpu", "gpu"])
    p.add_argument("--diffusers", action=argparse.BooleanOptionalAction, default=None,
                   help="also time diffusers + PEFT with the same LoRA files (default: when torch, diffusers "
                        "and peft import)")  # fmt: skip
    p.add_argument("--diffusers-fused", action="store_true", help="also time diffusers after fuse_lora")
    p.add_argument("--torch-device", default=None, help="default: cuda if available, else cpu")
    C.add_output_args(p)
    args = p.parse_args(argv)
    if 0 not in args.loras:
        args.loras = [0] + args.loras  # the baseline
    if args.diffusers is None:
        args.diffusers = diffusers_available()
    elif args.diffusers and not diffusers_available():
        p.error("--diffusers needs torch, diffusers and peft: pip install torch diffusers peft (or --no-diffusers)")
    if args.diffusers_fused and not args.diffusers:
        p.error("--diffusers-fused needs the diffusers baseline (torch, diffusers and peft)")
    return args


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def write_peft_lora(model: nn.Module, path: Path, rank: int, dtype: mx.Dtype, seed: int) -> Path:
    """A random LoRA in diffusers / PEFT naming on every Linear of the joint blocks (adaLN left
    out), named through the weight tables (so q / k / v are separate modules, as in diffusers)."""
    key = mx.random.key(seed)
    tensors: Dict[str, mx.array] = {}
    for stem, target in sorted(module_targets(TABLES[("transformer", "diffusers")], _our_names(model)).items()):
        module = runtime.get_layer(model, target.module)
        if not target.module.startswith("blocks.") or ".adaLN" in target.module or not isinstance(
            module, (nn.Linear, nn.QuantizedLinear, runtime.LoRALayer)
        ):  # norms have weights too
            continue
        out, inp = layer_dims(module)
        key, k1, k2 = mx.random.split(key, 3)
        tensors[f"transformer.{stem}.lora_A.weight"] = (mx.random.normal((rank, inp), key=k1) / inp**0.5).astype(dtype)
        tensors[f"transformer.{stem}.lora_B.weight"] = (mx.random.normal((out // target.parts, rank), key=k2) * 0.01).astype(dtype)
    mx.save_safetensors(str(path), tensors)
    return path


def time_steps(model, positive, negative, size: int, args) -> float:
    """Seconds per step of one run of --steps steps, after --warmup untimed runs (compilation)."""
    sigmas, sampler = C.schedule(args.steps + 1)
    den, _ = C.make_denoiser(model, positive, negative, sigmas=sigmas)
    noise = mx.random.normal((1, size // 8, size // 8, 16), key=mx.random.key(0))

    return C.time_per_step(lambda: C.denoise_run(den, noise, sampler, args.steps), args.steps, C.mlx_sync,
                           args.warmup, 1).median  # fmt: skip


def measure(model, positive, negative, size: int, args) -> Dict[int, C.Timing]:
    """{number of LoRAs: step timing}, the configurations interleaved round by round (so a
    machine whose load drifts affects all alike); LoRAs beyond the count are at weight 0,
    which the layer skips."""
    counts = sorted(args.loras)
    timings = {n: C.Timing() for n in counts}
    for _ in range(args.repeat):
        for n in counts:
            for j in range(max(counts)):
                runtime.set_scale(model, f"l{j}", 1.0 if j < n else 0.0)
            timings[n].runs.append(time_steps(model, positive, negative, size, args))
    return timings


def diffusers_measure(config, files: List[Path], size: int, args) -> Dict[str, C.Timing]:
    """diffusers' step ({"0", "1", "3", "1 fused", ...}: timing) with the LoRA files loaded
    through PEFT; the step is StableDiffusion3Pipeline's (batch-2 forward, CFG, Euler)."""
    import torch

    import torch_reference as R

    device = args.torch_device
    model = R.transformer(config, device)
    sync = R.sync(device)
    sigmas, _ = C.schedule(args.steps + 1)
    g = torch.Generator(device=device).manual_seed(size)
    noise = torch.randn((1, 16, size // 8, size // 8), generator=g, device=device, dtype=torch.bfloat16)
    ctx = torch.randn((2, C.CLIP_TOKENS + 256, 4096), generator=g, device=device, dtype=torch.bfloat16)
    pooled = torch.randn((2, 2048), generator=g, device=device, dtype=torch.bfloat16)

    def step(x, i):
        t = torch.full((2,), float(sigmas[i]) * 1000.0, device=device)
        v = model(hidden_states=torch.cat([x, x]), encoder_hidden_states=ctx, pooled_projections=pooled,
                  timestep=t, return_dict=False)[0]  # fmt: skip
        return R.cfg_euler(x, v, sigmas, i, C.CFG_SCALE)

    def seconds() -> float:
        with torch.no_grad():
            return C.time_per_step(lambda: C.run_steps(step, noise, args.steps), args.steps, sync, args.warmup, 1).median

    counts = sorted(n for n in args.loras if n)
    names = [f"l{j}" for j in range(len(files))]
    timings = {str(n): C.Timing() for n in [0] + counts}
    for _ in range(args.repeat):
        timings["0"].runs.append(seconds())  # before any adapter exists: plain diffusers
    for name, path in zip(names, files):
        model.load_lora_adapter(str(path.parent), weight_name=path.name, adapter_name=name, prefix="transformer")
    for _ in range(args.repeat):
        for n in counts:
            model.set_adapters(names[:n], [1.0] * n)
            timings[str(n)].runs.append(seconds())
    if args.diffusers_fused:
        for n in counts:
            model.set_adapters(names[:n], [1.0] * n)
            model.fuse_lora(adapter_names=names[:n])
            timings[f"{n} fused"] = C.Timing([seconds() for _ in range(args.repeat)])
            model.unfuse_lora()
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return timings


def fmt_mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def load_average() -> str:
    try:
        return "{:.1f}".format(os.getloadavg()[0])
    except OSError:
        return "?"


def main(argv=None) -> None:
    args = parse_args(argv)
    C.set_device(args.device)
    if args.diffusers:
        import torch

        args.torch_device = args.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = C.machine_info(args.torch_device if args.diffusers else None)
    dtype = C.DTYPES[args.dtype]
    t0 = time.perf_counter()
    print(C.machine_title(info) + (f"; diffusers on {args.torch_device}" if args.diffusers else ""))
    load_before = load_average()
    results, rows, fused_lines = [], [], []
    lora_dir = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    for model_name in args.model:
        name, config = C.MODELS[model_name]
        config = C.truncated(config, args.layers)
        files: List[Path] = []
        reference: Dict[int, Dict[str, C.Timing]] = {}  # size -> diffusers timings
        for bits in args.bits:
            model = C.random_network("transformer", config, dtype, None if bits >= 16 else bits)
            positive = C.random_conditioning(1, 256, dtype, seed=1)
            negative = C.random_conditioning(1, 256, dtype, seed=2)
            while len(files) < max(args.loras):  # the same files for every precision and for diffusers
                j = len(files)
                files.append(write_peft_lora(model, lora_dir / f"{model_name}_l{j}.safetensors", args.rank, dtype, j))
            memory = []  # MLX memory each LoRA added when attached, and the size of its factors
            for j, path in enumerate(files):
                before = mx.get_active_memory()
                attach_lora(model, "transformer", prepare(read_lora(path), {"transformer": model}, name=f"l{j}"))
                memory.append((mx.get_active_memory() - before, runtime.adapter_bytes(model, f"l{j}")))
            label = f"{bits}-bit" if bits < 16 else args.dtype
            for size in args.size:
                timings = measure(model, positive, negative, size, args)
                if args.diffusers and size not in reference:
                    reference[size] = diffusers_measure(config, files, size, args)
                    for key, timing in reference[size].items():
                        if key.endswith("fused"):
                            fused_lines.append(f"{name} {size}²: diffusers {key} LoRA(s) {C.fmt_seconds(timing.median)}"
                                               f"/step ({timing.median / reference[size]['0'].median:.3f}× its no LoRA)")
                ref = reference.get(size, {})
                base_time = timings[0].median
                for n, timing in timings.items():
                    ratio = timing.median / base_time
                    theirs: Optional[C.Timing] = ref.get(str(n))
                    vs_diffusers = timing.median / theirs.median if theirs else None
                    extra, lora_bytes = memory[n - 1] if n else (0, 0)
                    print(f"{name} {label} {size}²: {n} LoRA(s) {C.fmt_seconds(timing.median)}/step "
                          f"({ratio:.3f}× no LoRA)" + (f", LoRA {n} added {extra / 1e6:.1f} MB "
                          f"(its factors: {lora_bytes / 1e6:.1f} MB)" if n else "")
                          + (f"; diffusers {C.fmt_seconds(theirs.median)}/step, ours / diffusers "
                             f"{vs_diffusers:.3f}×" if theirs else ""))  # fmt: skip
                    results.append(dict(model=model_name, bits=bits, size=size, loras=n, rank=args.rank,
                                        step=timing.to_dict(), ratio=ratio, extra_bytes_last=extra,
                                        lora_bytes=lora_bytes, vs_diffusers=vs_diffusers,
                                        diffusers={k: t.to_dict() for k, t in ref.items()} if n == 0 else None))  # fmt: skip
                    rows.append([name, label, f"{size}²", n, C.fmt_seconds(timing.median),
                                 C.fmt_ratio(ratio, TARGET_ONE_LORA if n == 1 else None),
                                 fmt_mb(extra) if n else "–", fmt_mb(lora_bytes) if n else "–"]
                                + ([C.fmt_seconds(theirs.median if theirs else None),
                                    C.fmt_ratio(theirs.median / ref["0"].median if theirs else None),
                                    C.fmt_ratio(vs_diffusers)] if args.diffusers else []))  # fmt: skip
            runtime.detach(model)
            del model
            mx.clear_cache()
    headers = ["model", "weights", "size", "LoRAs", "step", "vs no LoRA", "memory added (last LoRA)", "its factors"]
    if args.diffusers:
        headers += [f"diffusers bf16 ({args.torch_device})", "diffusers vs its no LoRA", "ours / diffusers"]
    body = "\n\n".join(filter(None, [
        f"### Runtime LoRAs (`benchmarks/bench_lora.py`, rank {args.rank}, every joint-block Linear)",
        C.truncation_note(args.layers),
        C.markdown_table(headers, rows),
        "diffusers: SD3Transformer2DModel bf16 + SDPA, the same LoRA files through PEFT (`load_lora_adapter` + "
        "`set_adapters`, unfused). " + "; ".join(fused_lines) + ("." if fused_lines else "") if args.diffusers else "",
        CPU_NOTE if args.diffusers and not args.torch_device.startswith("cuda") else "",
        f"Goal: ≤ {TARGET_ONE_LORA}× with one rank-16 LoRA. Load average (1 min) {load_before} at the start, "
        f"{load_average()} at the end on {info['cpu_cores']} cores: a busy machine cannot resolve the ~1 % a "
        f"LoRA costs. `{info['command']}`",
    ]))  # fmt: skip
    shutil.rmtree(lora_dir, ignore_errors=True)
    C.publish(args, info, "lora", body, {"results": results, "wall_s": time.perf_counter() - t0}, print)


if __name__ == "__main__":
    main()
