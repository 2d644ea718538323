"""Cost of runtime LoRAs: a denoising step with 0, 1 and 3 LoRAs, at 16-bit and 4-bit, and the
memory each LoRA adds.

    python benchmarks/bench_lora.py --model medium large --size 1024 --bits 16 4 --write-docs
    python benchmarks/bench_lora.py --model medium --size 256 --layers 2 --steps 2   # quick CPU smoke run

Full-size random networks (benchmarks/common.py), CFG batch 2, T5 at 256 tokens, the step as
the pipeline runs it (`sd35_mlx.denoise.Denoiser`, compiled; quantized layers de-quantize
before large matmuls). Each LoRA is random, rank --rank, on every Linear of every joint block
(kohya's default set: both streams' qkv, proj, MLP; the adaLN modulations are computed once per
generation and are left out), the qkv as three diffusers-style q / k / v parts. The configurations
are timed in turn, round by round (--repeat rounds; each a warm-up run, then --steps timed
steps); figures are medians over the rounds, ratios against the step without LoRA of the same
process. Memory: MLX active memory after attaching a LoRA, minus before.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from sd35_mlx.adapters import lora as runtime  # noqa: E402
from sd35_mlx.adapters.targets import Placed, layer_dims  # noqa: E402

TARGET_ONE_LORA = 1.05  # the goal for one rank-16 LoRA


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
    p.add_argument("--results-dir", type=Path, default=C.RESULTS_DIR)
    p.add_argument("--docs", type=Path, default=C.DOCS_PAGE)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)
    if 0 not in args.loras:
        args.loras = [0] + args.loras  # the baseline
    return args


def random_placements(model: nn.Module, rank: int, dtype: mx.Dtype, seed: int) -> Dict[str, List[Placed]]:
    """A random LoRA on every Linear of the joint blocks (adaLN left out), qkv as q / k / v parts."""
    key = mx.random.key(seed)
    placed: Dict[str, List[Placed]] = {}
    for path, module in model.named_modules():
        if not path.startswith("blocks.") or ".adaLN" in path or ".base" in path:
            continue
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear, runtime.LoRALayer)):
            continue
        out, inp = layer_dims(module)
        parts = 3 if path.endswith(".qkv") else 1
        rows = out // parts
        placed[path] = []
        for j in range(parts):
            key, k1, k2 = mx.random.split(key, 3)
            down = (mx.random.normal((rank, inp), key=k1) / inp**0.5).astype(dtype)
            up = (mx.random.normal((rows, rank), key=k2) * 0.01).astype(dtype)
            placed[path].append(Placed(path, (j * rows, (j + 1) * rows), down, up, 1.0))
    return placed


def time_steps(model, positive, negative, size: int, args) -> float:
    """Seconds per step of one run of --steps steps, after --warmup untimed runs (compilation)."""
    sigmas, sampler = C.schedule(args.steps + 1)
    den, _ = C.make_denoiser(model, positive, negative, sigmas=sigmas)
    noise = mx.random.normal((1, size // 8, size // 8, 16), key=mx.random.key(0))

    def run():
        x = noise
        for i in range(args.steps):
            x = C.denoise_step(den, x, i, sampler)
            mx.eval(x)
        return x

    return C.time_calls(run, C.mlx_sync, args.warmup, 1).median / args.steps


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
    info = C.machine_info()
    dtype = C.DTYPES[args.dtype]
    t0 = time.perf_counter()
    print(C.machine_title(info))
    load_before = load_average()
    results, rows = [], []
    for model_name in args.model:
        name, config = C.MODELS[model_name]
        config = C.truncated(config, args.layers)
        for bits in args.bits:
            model = C.random_network("transformer", config, dtype, None if bits >= 16 else bits)
            positive = C.random_conditioning(1, 256, dtype, seed=1)
            negative = C.random_conditioning(1, 256, dtype, seed=2)
            memory = []  # MLX memory each LoRA added when attached, and the size of its factors
            for j in range(max(args.loras)):
                before = mx.get_active_memory()
                runtime.attach(model, random_placements(model, args.rank, dtype, seed=j), f"l{j}")
                memory.append((mx.get_active_memory() - before, runtime.adapter_bytes(model, f"l{j}")))
            label = f"{bits}-bit" if bits < 16 else args.dtype
            for size in args.size:
                timings = measure(model, positive, negative, size, args)
                base_time = timings[0].median
                for n, timing in timings.items():
                    ratio = timing.median / base_time
                    extra, lora_bytes = memory[n - 1] if n else (0, 0)
                    print(f"{name} {label} {size}²: {n} LoRA(s) {C.fmt_seconds(timing.median)}/step "
                          f"({ratio:.3f}× no LoRA)" + (f", LoRA {n} added {extra / 1e6:.1f} MB "
                          f"(its factors: {lora_bytes / 1e6:.1f} MB)" if n else ""))  # fmt: skip
                    results.append(dict(model=model_name, bits=bits, size=size, loras=n, rank=args.rank,
                                        step=timing.to_dict(), ratio=ratio, extra_bytes_last=extra,
                                        lora_bytes=lora_bytes))  # fmt: skip
                    rows.append([name, label, f"{size}²", n, C.fmt_seconds(timing.median),
                                 C.fmt_ratio(ratio, TARGET_ONE_LORA if n == 1 else None),
                                 fmt_mb(extra) if n else "–", fmt_mb(lora_bytes) if n else "–"])  # fmt: skip
            runtime.detach(model)
            del model
            mx.clear_cache()
    body = "\n\n".join(filter(None, [
        f"### Runtime LoRAs (`benchmarks/bench_lora.py`, rank {args.rank}, every joint-block Linear)",
        C.truncation_note(args.layers),
        C.markdown_table(["model", "weights", "size", "LoRAs", "step", "vs no LoRA", "memory added (last LoRA)",
                          "its factors"], rows),
        f"Goal: ≤ {TARGET_ONE_LORA}× with one rank-16 LoRA. Load average (1 min) {load_before} at the start, "
        f"{load_average()} at the end on {info['cpu_cores']} cores: a busy machine cannot resolve the ~1 % a "
        f"LoRA costs. `{info['command']}`",
    ]))  # fmt: skip
    C.publish(args, info, "lora", body, {"results": results, "wall_s": time.perf_counter() - t0}, print)


if __name__ == "__main__":
    main()
