"""How much does quantization change each network's output? Which layers are sensitive?

    python benchmarks/quantization_error.py              # tiny + full-width shallow networks
    python benchmarks/quantization_error.py --full       # + full-size networks that fit in RAM
    python benchmarks/quantization_error.py --model PATH # + the user's real weights and images

Writes benchmarks/results/quantization_error.md and .json.

Networks have random bf16 weights (std 1/sqrt(fan_in), norm scales 1±0.2, biases
0.1·N(0,1)). The reference is the same network unquantized; the quantized network is made
from those bf16 weights, as the converter does (bf16 scales). Both are computed in fp32 from
the stored values, so the error is what the storage format costs (and the CPU's slow
half-precision quantized kernels are avoided); a separate row shows what bf16 compute adds
on its own. Error = max|Δ|/max|ref| over all outputs (`max`) and ‖Δ‖/‖ref‖ (`rms`).

Sections:
1. bits × mode × network, with the default policy (`sd35_mlx.quantize.DEFAULT_KEEP`) and
   with every Linear quantized;
2. per layer kind: only that kind quantized at 4-bit; its share of the quantizable weights;
   error per share ("cost"). Kinds whose cost is far above 1 and whose share is small are
   the ones kept at 16-bit;
3. converted folder vs original (tiny model): load time and disk;
4. with --model: real weights, same table, plus image PSNR of quantized vs 16-bit
   generations from fixed seeds (through `sd35_mlx.SD35Pipeline` on converted folders).

Random weights have no outlier channels, which real checkpoints have: treat section 1 as
a lower bound of the real error and rerun with --model on real weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sd35_mlx.config import (  # noqa: E402
    CLIP_G, CLIP_L, CLIPConfig, MMDiTConfig, SD35_LARGE_MMDIT, SD35_MEDIUM_MMDIT, T5_XXL, T5Config,
)  # fmt: skip
from sd35_mlx.quantize import DEFAULT_KEEP, QuantSpec, quantize_network, quantizable_layers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# ------------------------------------------------------------------------------------------
# networks


def tiny_configs() -> Dict[str, object]:
    """Small, but every width a multiple of 128 so every group size applies."""
    return {
        "transformer": MMDiTConfig(depth=3, hidden_size=128, num_heads=2, context_dim=256,
                                   pooled_dim=128, pos_embed_max_size=16, qk_norm=True,
                                   dual_attention_layers=(0,)),  # fmt: skip
        "clip_l": CLIPConfig(hidden_size=128, num_layers=3, num_heads=2, intermediate_size=512,
                             projection_dim=128),  # fmt: skip
        "clip_g": CLIPConfig(hidden_size=128, num_layers=3, num_heads=2, intermediate_size=512,
                             activation="gelu", projection_dim=128),  # fmt: skip
        "t5": T5Config(d_model=128, num_layers=3, num_heads=2, d_kv=64, d_ff=256),
    }


def wide_configs() -> Dict[str, object]:
    """Real widths (the group structure of the real layers), two blocks deep."""
    from dataclasses import replace

    return {
        "transformer (3.5 Medium widths)": replace(SD35_MEDIUM_MMDIT, depth=2, pos_embed_max_size=32,
                                                   dual_attention_layers=(0,)),  # fmt: skip
        "transformer (3.5 Large widths)": replace(SD35_LARGE_MMDIT, depth=2, pos_embed_max_size=32),
        "clip_l": replace(CLIP_L, num_layers=2),
        "clip_g": replace(CLIP_G, num_layers=2),
        "t5": replace(T5_XXL, num_layers=2),
    }


def full_configs() -> Dict[str, object]:
    return {
        "clip_l": CLIP_L,
        "clip_g": CLIP_G,
        "transformer (3.5 Medium)": SD35_MEDIUM_MMDIT,
        "t5": T5_XXL,
        "transformer (3.5 Large)": SD35_LARGE_MMDIT,
    }


def component_of(label: str) -> str:
    return label.split(" ")[0]


def build(config) -> nn.Module:
    if isinstance(config, MMDiTConfig):
        return _mmdit_class()(config)
    if isinstance(config, CLIPConfig):
        from sd35_mlx.models.clip import CLIPTextEncoder

        return CLIPTextEncoder(config)
    if isinstance(config, T5Config):
        from sd35_mlx.models.t5 import T5Encoder

        return T5Encoder(config)
    raise TypeError(config)


def _mmdit_class():
    from sd35_mlx.models import mmdit

    class MMDiT(mmdit.MMDiT):
        # MMDiT.conditioning casts the timestep features to t_embedder.fc1's weight dtype,
        # which is uint32 once fc1 is quantized; cast to the model dtype instead so that the
        # sensitivity of t_embedder can be measured (production keeps t_embedder 16-bit).
        def conditioning(self, timestep, pooled):
            t = timestep if isinstance(timestep, mx.array) else mx.array(timestep)
            t_freq = mmdit.timestep_embedding(t).astype(self.dtype)
            return self.t_embedder(t_freq) + self.y_embedder(pooled.astype(self.dtype))

    return MMDiT


def randomize(model: nn.Module, seed: int, dtype=mx.bfloat16) -> nn.Module:
    """Every parameter random (norm scales included), then cast to `dtype`."""
    key = mx.random.key(seed)
    tables = {p for p, m in model.named_modules() if isinstance(m, nn.Embedding)}

    def fill(path: str, p: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        r = mx.random.normal(p.shape, key=sub)
        parent, name = path.rsplit(".", 1) if "." in path else ("", path)
        if parent in tables or name in ("pos_embed", "position_embedding"):
            v = r  # lookup tables
        elif p.ndim == 1 and name == "weight":
            v = 1.0 + 0.2 * r  # norm scales
        elif p.ndim == 1:
            v = 0.1 * r  # biases
        else:
            v = r / math.sqrt(math.prod(p.shape[1:]))
        return v.astype(dtype)

    model.update(tree_map_with_path(fill, model.parameters()))
    if isinstance(model.config, T5Config):
        # T5 attention is unscaled: its q projection is initialised 1/sqrt(d_kv) smaller
        # (Mesh-TF / HF init); without this, random logits are ~8x too large and attention
        # is a chaotic argmax that no quantization error can be measured against.
        inner = model.config.num_heads * model.config.d_kv
        for block in model.blocks:
            w = block.attn.qkv.weight
            block.attn.qkv.weight = mx.concatenate([w[:inner] * model.config.d_kv**-0.5, w[inner:]])
    mx.eval(model.parameters())
    return model


def to_float32(model: nn.Module) -> nn.Module:
    """Compute in fp32 with the stored values (bf16 weights, bf16 scales) unchanged."""
    model.set_dtype(mx.float32)  # floating parameters only: packed weights, e8m0 scales stay
    return model


def make_inputs(model: nn.Module, seed: int, small: bool = False) -> tuple:
    """Random inputs. `small` (full-width networks): fewer tokens, because MLX's CPU matmul
    is slow; each output still has thousands of values, enough for the statistics."""
    rng = np.random.default_rng(seed)
    cfg = model.config
    if isinstance(cfg, MMDiTConfig):
        side, n_ctx = (8, 32) if small else (16, 77)  # (side/2)² image tokens + n_ctx text tokens
        lat = mx.array(rng.standard_normal((1, side, side, cfg.in_channels)).astype(np.float32))
        ctx = mx.array(rng.standard_normal((1, n_ctx, cfg.context_dim)).astype(np.float32))
        pooled = mx.array(rng.standard_normal((1, cfg.pooled_dim)).astype(np.float32))
        return (lat, mx.array([700.0]), ctx, pooled)
    rows, length = (1, 32) if small else (2, 77)
    if isinstance(cfg, CLIPConfig):
        ids = rng.integers(1, 49405, (rows, length))
        ids[:, 0] = 49406
        ids[0, length // 4:] = 49407  # CLIP-L style padding with EOS
        if rows > 1:
            ids[1, 60] = 49407
            ids[1, 61:] = 0  # CLIP-G style padding with 0
        return (mx.array(ids),)
    ids = rng.integers(3, cfg.vocab_size, (rows, length))
    ids[0, length // 2] = 1
    ids[0, length // 2 + 1:] = 0
    return (mx.array(ids),)


def outputs(model: nn.Module, inputs: tuple) -> List[mx.array]:
    out = model(*inputs)
    if isinstance(out, tuple):
        out = list(out)
    else:
        out = [out]
    out = [o.astype(mx.float32) for o in out]
    mx.eval(out)
    return out


def errors(ref: Sequence[mx.array], out: Sequence[mx.array]) -> Tuple[float, float]:
    mx_err, rms_err = 0.0, 0.0
    for r, o in zip(ref, out):
        r, o = np.array(r), np.array(o)
        d = np.abs(o - r)
        mx_err = max(mx_err, float(d.max() / max(np.abs(r).max(), 1e-12)))
        rms_err = max(rms_err, float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-12)))
    return mx_err, rms_err


def quantized_copy(config, weights: dict, spec: Optional[QuantSpec], component: str) -> nn.Module:
    """Quantized from the bf16 weights (as stored), then computed in fp32."""
    model = build(config)
    model.load_weights(list(weights.items()))
    return to_float32(quantize_network(model, spec, component))


def reference(config, weights: dict, dtype=mx.float32) -> nn.Module:
    model = build(config)
    model.load_weights(list(weights.items()))
    model.set_dtype(dtype)
    return model


# ------------------------------------------------------------------------------------------
# section 1 and 2

SPECS: List[Tuple[str, int, int, str]] = [
    ("8-bit", 8, 64, "affine"),
    ("6-bit", 6, 64, "affine"),
    ("5-bit", 5, 64, "affine"),
    ("4-bit", 4, 64, "affine"),
    ("4-bit g32", 4, 32, "affine"),
    ("4-bit g128", 4, 128, "affine"),
    ("3-bit", 3, 64, "affine"),
    ("2-bit", 2, 64, "affine"),
    ("mxfp8", 8, 32, "mxfp8"),
    ("mxfp4", 4, 32, "mxfp4"),
    ("nvfp4", 4, 16, "nvfp4"),
]

KINDS: Dict[str, Dict[str, str]] = {
    "transformer": {
        "t_embedder": r"t_embedder\..*",
        "y_embedder": r"y_embedder\..*",
        "context_embedder": r"context_embedder",
        "block adaLN": r"blocks\.\d+\.(x|context)\.adaLN",
        "attn qkv": r"blocks\.\d+\.(x|context)\.attn2?\.qkv",
        "attn proj": r"blocks\.\d+\.(x|context)\.attn2?\.proj",
        "mlp fc1": r"blocks\.\d+\.(x|context)\.mlp\.fc1",
        "mlp fc2": r"blocks\.\d+\.(x|context)\.mlp\.fc2",
        "final adaLN": r"final_layer\.adaLN",
        "final linear": r"final_layer\.linear",
    },
    "clip": {
        "attn qkv": r"layers\.\d+\.attn\.qkv",
        "attn out": r"layers\.\d+\.attn\.out",
        "mlp fc1": r"layers\.\d+\.mlp\.fc1",
        "mlp fc2": r"layers\.\d+\.mlp\.fc2",
        "text_projection": r"text_projection",
    },
    "t5": {
        "attn qkv": r"blocks\.\d+\.attn\.qkv",
        "attn o": r"blocks\.\d+\.attn\.o",
        "ff wi_0, wi_1": r"blocks\.\d+\.ff\.wi_[01]",
        "ff wo": r"blocks\.\d+\.ff\.wo",
    },
}


def kinds_for(component: str) -> Dict[str, str]:
    return KINDS["clip" if component.startswith("clip") else component]


def only(pattern: str) -> Tuple[str, ...]:
    """keep-patterns that keep everything except `pattern`."""
    return (rf"(?!(?:{pattern})\Z).*",)


def linear_params(model: nn.Module, paths: Sequence[str]) -> int:
    sizes = {p: m.weight.size for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sum(sizes[p] for p in paths)


@dataclass
class Row:
    network: str
    size: str
    spec: str
    policy: str
    max_err: float
    rms_err: float
    bits_per_weight: float


def bits_per_weight(model: nn.Module) -> float:
    """Average stored bits per weight of the quantizable Linear layers (incl. scales/biases)."""
    total_bits, total_w = 0, 0
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            n = m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits
            # as stored: floating scales/biases in 16-bit (the benchmark computes in fp32)
            side = sum(a.size * (2 if mx.issubdtype(a.dtype, mx.floating) else a.itemsize)
                       for a in (m.scales, m.get("biases")) if a is not None)  # fmt: skip
            total_bits += (m.weight.nbytes + side) * 8
            total_w += n
        elif isinstance(m, nn.Linear):
            total_bits += m.weight.size * 16
            total_w += m.weight.size
    return total_bits / max(total_w, 1)


def table_for(label: str, size: str, config, seed: int, specs=SPECS,
              all_policy=("8-bit", "4-bit", "mxfp4"), small: bool = False) -> List[Row]:  # fmt: skip
    """Rows for each spec with the default policy, and for `all_policy` specs with every
    Linear quantized too. Plus the floor: bf16 compute vs fp32 compute, unquantized."""
    component = component_of(label)
    weights = dict(tree_flatten(randomize(build(config), seed).parameters()))
    ref_model = reference(config, weights)
    inputs = make_inputs(ref_model, seed, small)
    ref = outputs(ref_model, inputs)
    del ref_model
    e = errors(ref, outputs(reference(config, weights, mx.bfloat16), inputs))
    rows = [Row(label, size, "bf16 compute (no quantization)", "-", e[0], e[1], 16.0)]
    for name, bits, group, mode in specs:
        for policy in ("default", "all") if name in all_policy else ("default",):
            keep = DEFAULT_KEEP[component] if policy == "default" else ()
            spec = QuantSpec(bits, group, mode, tuple(keep))
            q = quantized_copy(config, weights, spec, component)
            e = errors(ref, outputs(q, inputs))
            rows.append(Row(label, size, name, policy, e[0], e[1], bits_per_weight(q)))
            del q
    return rows


REAL_CONFIGS = {
    "transformer (3.5 Medium widths)": SD35_MEDIUM_MMDIT,
    "transformer (3.5 Large widths)": SD35_LARGE_MMDIT,
    "clip_l": CLIP_L,
    "clip_g": CLIP_G,
    "t5": T5_XXL,
}
KEEP_RULE = "cost > 1 and share of the real network < 1%"


def real_shares(label: str, bits: int, group: int) -> Dict[str, float]:
    """Each kind's share of the full-size network's Linear weights (built lazily: no memory)."""
    model = build(REAL_CONFIGS[label])
    paths = quantizable_layers(model, QuantSpec(bits, group, "affine"))
    total = linear_params(model, paths)
    return {kind: linear_params(model, [p for p in paths if re.fullmatch(pattern, p)]) / total
            for kind, pattern in kinds_for(component_of(label)).items()}  # fmt: skip


def sensitivity_for(label: str, config, seed: int, bits: int = 4, group: int = 64, small: bool = True) -> List[dict]:
    component = component_of(label)
    real = real_shares(label, bits, group)
    weights = dict(tree_flatten(randomize(build(config), seed).parameters()))
    model = reference(config, weights)
    inputs = make_inputs(model, seed, small)
    ref = outputs(model, inputs)
    all_paths = quantizable_layers(model, QuantSpec(bits, group, "affine"))
    total = linear_params(model, all_paths)
    q = quantized_copy(config, weights, QuantSpec(bits, group, "affine"), component)
    all_err = errors(ref, outputs(q, inputs))
    del q
    out = [dict(network=label, kind="(all Linear)", share=1.0, real_share=1.0, max_err=all_err[0],
                rms_err=all_err[1], cost=1.0, rule_keeps=False, default_keeps=False)]  # fmt: skip
    for kind, pattern in kinds_for(component).items():
        rx = re.compile(pattern)
        paths = [p for p in all_paths if rx.fullmatch(p)]
        if not paths:
            continue
        share = linear_params(model, paths) / total
        q = quantized_copy(config, weights, QuantSpec(bits, group, "affine", only(pattern)), component)
        e = errors(ref, outputs(q, inputs))
        del q
        # error share per weight share: > 1 = this kind costs more error than it saves memory
        cost = (e[1] / max(all_err[1], 1e-12)) / share
        keep = cost > 1.0 and real[kind] < 0.01
        kept = any(re.fullmatch(k, p) for k in DEFAULT_KEEP[component] for p in paths)
        out.append(dict(network=label, kind=kind, share=share, real_share=real[kind], max_err=e[0],
                        rms_err=e[1], cost=cost, rule_keeps=keep, default_keeps=kept))  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------
# section 3: converted folder vs original (tiny model)


def load_and_disk(tmp: Path) -> List[dict]:
    """Tiny diffusers model vs its converted folders: time to a usable network, bytes on disk."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import make_tiny_model  # noqa: E402 (test helper: tiny official layout)

    from sd35_mlx.convert import convert
    from sd35_mlx.loading import load_text_encoders, load_transformer, load_vae

    src = tmp / "diffusers"
    make_tiny_model(src)
    rows = []
    targets = {"original (diffusers fp32)": src}
    for name, q in (("converted bf16", "none"), ("converted t5=4:32,transformer=4:32", "t5=4:32,transformer=4:32")):
        out = tmp / name.replace(" ", "_").replace(",", "_").replace("=", "").replace(":", "")
        convert(str(src), str(out), quantize=q, quiet=True)
        targets[name] = out

    def weights_bytes(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))

    for name, folder in targets.items():
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            nets = [load_transformer(folder), load_vae(folder)]
            enc = load_text_encoders(folder)
            nets += [enc.clip_l, enc.clip_g, enc.t5]
            mx.eval([n.parameters() for n in nets])
            times.append(time.perf_counter() - t0)
        rows.append(dict(model=name, load_s=float(np.median(times)), weights_bytes=weights_bytes(folder)))
    return rows


# ------------------------------------------------------------------------------------------
# section 4: real weights


def real_model_section(model_path: str, seeds: Sequence[int], steps: int, size: int, tmp: Path) -> dict:
    """Real weights: per-network output error and image PSNR vs the 16-bit model.

    Each setting is converted with `sd35_mlx.convert` into `tmp`, then generated with
    `sd35_mlx.SD35Pipeline.from_pretrained(folder)`, so exactly what users run is measured.
    """
    from sd35_mlx.convert import convert

    settings = {"16-bit": "none", "t5=4": "t5=4", "t5=8": "t5=8",
                "transformer=8": "transformer=8,t5=4", "transformer=4": "transformer=4,t5=4",
                "all 4-bit": "transformer=4,clip_l=4,clip_g=4,t5=4"}  # fmt: skip
    folders = {}
    for name, q in settings.items():
        folders[name] = tmp / re.sub(r"[^a-z0-9]+", "_", name.lower())
        convert(model_path, str(folders[name]), quantize=q, quiet=True)

    try:
        from sd35_mlx.pipeline import SD35Pipeline
    except ImportError as e:  # the pipeline lands separately; the networks table still runs
        return {"error": f"sd35_mlx.SD35Pipeline unavailable: {e}"}

    prompts = ["a photo of a red fox in the snow, detailed fur",
               "a watercolor painting of a lighthouse at dusk"]  # fmt: skip
    images: Dict[str, List[np.ndarray]] = {}
    for name, folder in folders.items():
        pipe = SD35Pipeline.from_pretrained(folder)
        images[name] = []
        for prompt in prompts:
            for seed in seeds:
                img = pipe.generate(prompt, seed=seed, steps=steps, width=size, height=size).image
                images[name].append(np.asarray(img, dtype=np.float64))
        del pipe
    psnr = {}
    for name, imgs in images.items():
        vals = []
        for a, b in zip(imgs, images["16-bit"]):
            mse = float(np.mean((a - b) ** 2))
            vals.append(99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse))
        psnr[name] = dict(mean=float(np.mean(vals)), min=float(np.min(vals)))
    sizes = {name: sum(f.stat().st_size for f in folder.glob("*.safetensors*")) for name, folder in folders.items()}
    return {"psnr_db": psnr, "bytes": sizes, "steps": steps, "size": size, "seeds": list(seeds)}


def real_network_rows(model_path: str, seed: int) -> List[Row]:
    """The section-1 table on the real networks (memory permitting, one at a time)."""
    from sd35_mlx.loading import load_text_encoders, load_transformer

    rows: List[Row] = []
    loaders: Dict[str, Callable[[], nn.Module]] = {
        "clip_l": lambda: load_text_encoders(model_path, dtype=mx.bfloat16, t5=False).clip_l,
        "clip_g": lambda: load_text_encoders(model_path, dtype=mx.bfloat16, t5=False).clip_g,
        "t5": lambda: load_text_encoders(model_path, dtype=mx.bfloat16).t5,
        "transformer": lambda: load_transformer(model_path, dtype=mx.bfloat16),
    }
    specs = [s for s in SPECS if s[0] in ("8-bit", "6-bit", "4-bit", "3-bit", "mxfp4")]
    for component, load in loaders.items():
        model = load()
        weights = dict(tree_flatten(model.parameters()))
        config = model.config
        del model
        ref_model = reference(config, weights)
        inputs = make_inputs(ref_model, seed)
        ref = outputs(ref_model, inputs)
        del ref_model
        for name, bits, group, mode in specs:
            spec = QuantSpec(bits, group, mode, DEFAULT_KEEP[component])
            q = quantized_copy(config, weights, spec, component)
            e = errors(ref, outputs(q, inputs))
            rows.append(Row(f"{component} (real)", "real", name, "default", e[0], e[1], bits_per_weight(q)))
            del q
        del weights
        mx.clear_cache()
    return rows


# ------------------------------------------------------------------------------------------
# report


def fmt(x: float) -> str:
    return f"{x:.2e}"


def write_report(rows: List[Row], sens: List[dict], loads: List[dict], real: Optional[dict],
                 args: argparse.Namespace, elapsed: float) -> None:  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = ["# Quantization error", "",
             f"`python benchmarks/quantization_error.py {' '.join(sys.argv[1:])}` — mlx {mx.__version__}, "
             f"{elapsed:.0f} s. Random bf16 weights; reference = the same network unquantized; both "
             "computed in fp32 from the stored values (bf16 weights, bf16 scales), so the numbers are "
             "the storage error alone; the first row of each table is what bf16 compute adds on its own. "
             "`max` = max|Δ|/max|ref|, `rms` = ‖Δ‖/‖ref‖ over all outputs (CLIP: hidden and pooled, "
             "the worse of the two). `policy` default = `DEFAULT_KEEP` layers stay 16-bit; all = every "
             "Linear quantized. `bits/w` = stored bits per quantizable weight (scales and biases included).",
             "", "## 1. Error by bits and mode", ""]  # fmt: skip
    by_net: Dict[Tuple[str, str], List[Row]] = {}
    for r in rows:
        by_net.setdefault((r.network, r.size), []).append(r)
    for (net, size), rs in by_net.items():
        lines += [f"### {net} ({size})", "", "| spec | policy | max | rms | bits/w |", "|---|---|---|---|---|"]
        lines += [f"| {r.spec} | {r.policy} | {fmt(r.max_err)} | {fmt(r.rms_err)} | {r.bits_per_weight:.2f} |" for r in rs]
        lines.append("")
    agree = all(s["rule_keeps"] == s["default_keeps"] for s in sens)
    lines += ["## 2. Sensitivity by layer kind (only that kind quantized, 4-bit g64)", "",
              "`share` = the kind's share of the quantizable weights of the network measured (two "
              "blocks: embedders and final layer weigh much more than at full depth); `real share` = "
              "its share in the full-size network; `cost` = (its rms error / the all-quantized rms "
              "error) / share: above 1, the kind costs more error than the memory it saves. "
              f"Rule: keep at 16-bit when {KEEP_RULE}. `DEFAULT_KEEP` "
              + ("agrees with the rule on every kind." if agree else "**disagrees with the rule** (see the last columns)."),
              ""]  # fmt: skip
    cur = None
    for s in sens:
        if s["network"] != cur:
            cur = s["network"]
            lines += ["", f"### {cur}", "", "| kind | share | real share | max | rms | cost | rule keeps | DEFAULT_KEEP keeps |",
                      "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        yes = lambda b: "yes" if b else ""  # noqa: E731
        lines.append(f"| {s['kind']} | {s['share']:.4f} | {s['real_share']:.4f} | {fmt(s['max_err'])} | "
                     f"{fmt(s['rms_err'])} | {s['cost']:.1f} | {yes(s['rule_keeps'])} | {yes(s['default_keeps'])} |")  # fmt: skip
    lines += ["", "## Sizes at full scale (GB, bf16 tensors and scales; computed from shapes)", "",
              "| network | " + " | ".join(n for n, _ in SIZE_SPECS) + " |", "|---|" + "---|" * len(SIZE_SPECS)]
    lines += [f"| {name} | " + " | ".join(f"{b / 1e9:.2f}" for b in row) + " |" for name, row in full_sizes()]
    if loads:
        lines += ["", "## 3. Converted folder vs original (tiny model, all five networks)", "",
                  "| model | load (median of 5) | weights on disk |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {d['model']} | {d['load_s'] * 1000:.0f} ms | {d['weights_bytes'] / 1e6:.2f} MB |" for d in loads]
    if real is not None:
        lines += ["", "## 4. Real weights", "", "```", json.dumps(real, indent=1), "```"]
    (RESULTS / "quantization_error.md").write_text("\n".join(lines) + "\n")
    payload = dict(rows=[r.__dict__ for r in rows], sensitivity=sens, load=loads, real=real,
                   mlx=mx.__version__, args=vars(args), seconds=elapsed)  # fmt: skip
    (RESULTS / "quantization_error.json").write_text(json.dumps(payload, indent=1) + "\n")


SIZE_SPECS = [("16-bit", None), ("8-bit", (8, 64, "affine")), ("6-bit", (6, 64, "affine")),
              ("4-bit", (4, 64, "affine")), ("4-bit g32", (4, 32, "affine")), ("3-bit", (3, 64, "affine")),
              ("mxfp4", (4, 32, "mxfp4"))]  # fmt: skip


def full_sizes() -> List[Tuple[str, List[int]]]:
    """Converted size of each full-size network per spec (lazy networks: nothing allocated)."""
    from sd35_mlx.config import SD3_MEDIUM_MMDIT
    from sd35_mlx.quantize import make_spec
    from sd35_mlx.weights.converted import stored_bytes

    nets = [("MMDiT SD3.5 Large", SD35_LARGE_MMDIT), ("MMDiT SD3.5 Medium", SD35_MEDIUM_MMDIT),
            ("MMDiT SD3 Medium", SD3_MEDIUM_MMDIT), ("CLIP-L", CLIP_L), ("CLIP-G", CLIP_G), ("T5-XXL", T5_XXL)]  # fmt: skip
    out = []
    for name, cfg in nets:
        component = {MMDiTConfig: "transformer", T5Config: "t5"}.get(type(cfg), "clip_g")
        row = []
        for _, s in SIZE_SPECS:
            model = build(cfg)
            model.set_dtype(mx.bfloat16)
            if s is not None:
                quantize_network(model, make_spec(component, *s), component)
            row.append(stored_bytes(model))
        out.append((name, row))
    return out


def enough_memory(config) -> bool:
    """bf16 weights (2 B/param) + the fp32 reference (4 B) + a quantized copy (< 1 B) must fit."""
    model = build(config)
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return False
    return n * 7 < total * 0.8


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="also full-size networks that fit in memory")
    p.add_argument("--model", help="real weights (repo id or folder): their table + image PSNR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20, help="denoising steps for --model images")
    p.add_argument("--size", type=int, default=512, help="image side for --model images")
    p.add_argument("--skip-load", action="store_true", help="skip section 3 (needs the loaders)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows: List[Row] = []
    sens: List[dict] = []
    for label, cfg in tiny_configs().items():
        print("tiny", label, f"{time.perf_counter() - t0:.0f} s", flush=True)
        rows += table_for(label, "tiny", cfg, args.seed)
    wide_specs = [s for s in SPECS if s[0] not in ("5-bit", "2-bit")]
    for label, cfg in wide_configs().items():
        print("wide", label, f"{time.perf_counter() - t0:.0f} s", flush=True)
        rows += table_for(label, "full width, 2 blocks", cfg, args.seed, specs=wide_specs,
                          all_policy=("4-bit",), small=True)  # fmt: skip
        sens += sensitivity_for(label, cfg, args.seed, small=True)
    if args.full:
        for label, cfg in full_configs().items():
            if not enough_memory(cfg):
                print("full", label, "skipped: not enough memory", flush=True)
                continue
            print("full", label, flush=True)
            few = [s for s in SPECS if s[0] in ("8-bit", "4-bit", "3-bit", "mxfp4")]
            rows += table_for(label, "full size", cfg, args.seed, specs=few, all_policy=(), small=True)
            mx.clear_cache()
    loads: List[dict] = []
    real = None
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_load:
            print("load time / disk", flush=True)
            loads = load_and_disk(Path(tmp) / "load")
        if args.model:
            print("real weights", flush=True)
            rows += real_network_rows(args.model, args.seed)
            real = real_model_section(args.model, (0, 1, 2), args.steps, args.size, Path(tmp) / "real")
    write_report(rows, sens, loads, real, args, time.perf_counter() - t0)
    print(f"wrote {RESULTS / 'quantization_error.md'}")


if __name__ == "__main__":
    main()
