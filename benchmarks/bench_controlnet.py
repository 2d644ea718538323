"""Speed of an SD3.5 Large denoising step with one ControlNet, against diffusers in the same run.

    python benchmarks/bench_controlnet.py --size 1024 --bits 16 4 --torch --write-docs
    python benchmarks/bench_controlnet.py --size 256 --layers 2 --steps 1 --repeat 1   # quick CPU smoke run

Full-size random networks (SD3.5 Large transformer, 38 blocks, and Stability's SD3.5 Large
ControlNet architecture, 19 image-only blocks, 2.15 B parameters), CFG batch 2, T5 at
--t5-tokens. For each --bits (the transformer and the ControlNet both; 16 = --dtype):
- ours: `Denoiser(controlnets=[…])` step exactly as the pipeline runs it, and the same step
  without the ControlNet (what the ControlNet adds);
- with --torch: diffusers' StableDiffusion3ControlNetPipeline step (SD3ControlNetModel +
  SD3Transformer2DModel with block_controlnet_hidden_states, bf16, SDPA, no_grad), and the ratio.
A step is timed as a generation runs it: whole runs of --steps steps synchronised once at the
end (ours through `Denoiser.run`, the pipeline's loop), per step = run time / --steps.
Warm-up runs are excluded; figures are medians; the goal is the plain step's ≤ 0.75x diffusers.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import mlx.core as mx  # noqa: E402

from sd35_mlx.config import SD35_LARGE_CONTROLNET, SD35_LARGE_MMDIT  # noqa: E402

TARGET_VS_DIFFUSERS = 0.75


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", nargs="+", type=int, default=[1024], help="image sides in pixels")
    p.add_argument("--bits", nargs="+", type=int, default=[16, 4], help="16 (= --dtype) or 4/8 for both networks")
    p.add_argument("--t5-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, default=None, help="truncate the transformer (and the ControlNet to half)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(C.DTYPES))
    p.add_argument("--device", default="default", choices=["default", "cpu", "gpu"])
    p.add_argument("--torch", action="store_true", help="also time diffusers' ControlNet pipeline step")
    p.add_argument("--torch-device", default=None)
    C.add_output_args(p)
    args = p.parse_args(argv)
    if any(s % 16 for s in args.size):
        p.error("sizes must be multiples of 16")
    return args


def configs(layers):
    mmdit = C.truncated(SD35_LARGE_MMDIT, layers)
    cn = replace(SD35_LARGE_CONTROLNET, depth=max(1, mmdit.depth // 2))
    return mmdit, cn


def log(msg: str) -> None:
    print(msg, flush=True)


def mlx_rows(args, dtype) -> List[Dict[str, Any]]:
    from sd35_mlx.control.residuals import STABILITY
    from sd35_mlx.control.stack import ActiveControlNet
    from sd35_mlx.models.controlnet import ControlNet
    from sd35_mlx.quantize import make_spec, quantize_network

    mmdit_cfg, cn_cfg = configs(args.layers)
    rows = []
    for bits in args.bits:
        transformer = C.random_network("transformer", mmdit_cfg, dtype, bits if bits < 16 else None)
        mx.random.seed(1)
        net = ControlNet(cn_cfg)
        net.set_dtype(dtype)
        if bits < 16:
            quantize_network(net, make_spec("controlnet", bits), "controlnet")
        C.materialise(net)
        for size in args.size:
            h = w = size // 8
            noise = mx.random.normal((1, h, w, 16), key=mx.random.key(size))
            control = mx.random.normal((1, h, w, 16), key=mx.random.key(size + 1))
            cond = C.random_conditioning(2, args.t5_tokens, dtype)
            sigmas, sampler = C.schedule(args.steps)
            row: Dict[str, Any] = dict(size=size, bits=bits)
            for label, nets in (("with_controlnet", [ActiveControlNet(net, STABILITY, control)]), ("plain", [])):
                denoiser, _ = C.make_denoiser(transformer, cond[1], cond[0], sigmas=sigmas, controlnets=nets)
                timing = C.time_per_step(lambda d=denoiser: C.denoise_run(d, noise, sampler, args.steps), args.steps,
                                         C.mlx_sync, args.warmup, args.repeat)  # fmt: skip
                row[label] = timing.to_dict()
                log(f"[mlx] {size}² {bits}-bit {label}: {C.fmt_seconds(timing.median)} per step")
            rows.append(row)
        del transformer, net
        mx.clear_cache()
    return rows


def torch_rows(args, device: str) -> List[Dict[str, Any]]:
    import torch
    import torch_reference as R
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    mmdit_cfg, cn_cfg = configs(args.layers)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            main = SD3Transformer2DModel(
                sample_size=128, patch_size=2, in_channels=16, num_layers=mmdit_cfg.depth, attention_head_dim=64,
                num_attention_heads=mmdit_cfg.num_heads, joint_attention_dim=4096,
                caption_projection_dim=mmdit_cfg.hidden_size, pooled_projection_dim=2048, out_channels=16,
                pos_embed_max_size=mmdit_cfg.pos_embed_max_size, qk_norm="rms_norm").eval()  # fmt: skip
            cn = SD3ControlNetModel(
                patch_size=2, in_channels=16, num_layers=cn_cfg.depth, attention_head_dim=64,
                num_attention_heads=cn_cfg.num_heads, joint_attention_dim=None, caption_projection_dim=2048,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=None, pos_embed_type=None,
                use_pos_embed=False, force_zeros_for_pooled_projection=False).eval()  # fmt: skip
            cn.pos_embed = cn._get_pos_embed_from_transformer(main)  # as the diffusers pipeline does
    finally:
        torch.set_default_dtype(old)

    sync = R.sync(device)
    sigmas, _ = C.schedule(args.steps)
    rows = []
    for size in args.size:
        h = w = size // 8
        g = torch.Generator(device=device).manual_seed(size)
        noise = torch.randn((1, 16, h, w), generator=g, device=device, dtype=torch.bfloat16)
        control = torch.randn((2, 16, h, w), generator=g, device=device, dtype=torch.bfloat16)
        ctx = torch.randn((2, C.CLIP_TOKENS + args.t5_tokens, 4096), generator=g, device=device, dtype=torch.bfloat16)
        pooled = torch.randn((2, 2048), generator=g, device=device, dtype=torch.bfloat16)

        @torch.no_grad()
        def step(x, i):  # StableDiffusion3ControlNetPipeline's loop body
            x2 = torch.cat([x, x])
            t = torch.full((2,), float(sigmas[i]) * 1000.0, device=device)
            res = cn(hidden_states=x2, timestep=t, pooled_projections=pooled, controlnet_cond=control,
                     conditioning_scale=1.0, return_dict=False)[0]  # fmt: skip
            v = main(hidden_states=x2, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled,
                     block_controlnet_hidden_states=res, return_dict=False)[0]  # fmt: skip
            return R.cfg_euler(x, v, sigmas, i, C.CFG_SCALE)

        sync(None)
        timing = C.time_per_step(lambda: C.run_steps(step, noise, args.steps), args.steps, sync, args.warmup,
                                 args.repeat)  # fmt: skip
        rows.append(dict(size=size, **timing.to_dict()))
        log(f"[diffusers] {size}² bf16 with ControlNet: {C.fmt_seconds(timing.median)} per step")
    return rows


def report(args, results) -> str:
    theirs = {r["size"]: r["median_s"] for r in results.get("diffusers", [])}
    rows = []
    for r in results["mlx"]:
        ours, plain = r["with_controlnet"]["median_s"], r["plain"]["median_s"]
        ref = theirs.get(r["size"])
        label = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[args.dtype] if r["bits"] >= 16 else f"{r['bits']}-bit"
        rows.append([f"{r['size']}²", label, C.fmt_seconds(ours),
                     C.fmt_seconds(plain), C.fmt_seconds(ref),
                     C.fmt_ratio(ours / ref if ref else None, TARGET_VS_DIFFUSERS)])  # fmt: skip
    table = C.markdown_table(["size", "weights", "ours, step + ControlNet", "ours, plain step",
                              "diffusers ControlNet step (bf16)", "ours / diffusers"], rows)  # fmt: skip
    note = C.truncation_note(args.layers) if args.layers else ""
    how = (f"A step: a run of {args.steps} steps synchronised once at its end, / {args.steps} (ours through the "
           "pipeline's loop); the median of the runs.")  # fmt: skip
    return f"SD3.5 Large with one SD3.5 Large ControlNet (19 blocks), CFG batch 2. {how}\n\n{table}\n{note}"


def main(argv=None) -> int:
    args = parse_args(argv)
    C.set_device(args.device)
    dtype = C.DTYPES[args.dtype]
    torch_device = C.baseline_device(args.torch, args.torch_device)
    info = C.announce(torch_device, log)
    t0 = time.perf_counter()
    results: Dict[str, Any] = {"settings": C.settings_of(args)}
    results["mlx"] = mlx_rows(args, dtype)
    if torch_device:
        results["diffusers"] = torch_rows(args, torch_device)
    results["wall_s"] = time.perf_counter() - t0
    body = "### Speed: SD3.5 Large step with a ControlNet\n\n" + report(args, results)
    print("\n" + body + "\n")
    key = "controlnet" + (f"-layers{args.layers}" if args.layers else "")
    C.publish(args, info, key, body, results, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
