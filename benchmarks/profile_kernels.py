"""Every CUDA kernel of our denoising step, and of diffusers' (eager) step, by name and time.

    python benchmarks/profile_kernels.py --model medium --size 1024 --torch

torch.profiler (CUPTI) records all CUDA kernel launches of the process, MLX's included, so
the same tool times both sides. Per side: --steps steps after a warm-up, kernels grouped by
a short name (GEMM, attention, our kernels, MLX's fused elementwise kernels, LayerNorm, ...),
count and GPU time per step; and the GPU's busy time per step against the step's wall time
(busy ≪ wall: the step waits on the host, not on the GPU). CUDA only; run it with
MLX_USE_CUDA_GRAPHS=0 so each MLX kernel is its own launch for the profiler (the step time
does not change: docs/performance.md).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

GROUPS = [  # (group, pattern on the kernel name), first match wins
    ("attention (cuDNN / flash)", r"cudnn|flash_fwd|fmha|attention|sdpa"),
    ("GEMM", r"gemm|nvjet|xmma|cublas|ampere_|sm80_|sm90_"),
    ("our kernels (sd35_*)", r"sd35_"),
    ("LayerNorm / RMSNorm", r"layer_norm|LayerNorm|rms_norm|RMSNorm"),
    ("MLX fused elementwise (mx.compile)", r"cu::[A-Z]+V2"),
    ("copy / transpose / concat", r"copy|Copy|transpose|contiguous|Cat"),
    ("elementwise / reduce (other)", r"."),
]


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="medium", choices=sorted(C.MODELS))
    p.add_argument("--size", nargs="+", type=int, default=[1024])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--bits", type=int, default=16, choices=(16, 8, 4), help="our transformer's weights")
    p.add_argument("--t5-tokens", type=int, default=256)
    p.add_argument("--top", type=int, default=12, help="kernel names listed per side")
    p.add_argument("--torch", action="store_true", help="also profile diffusers' eager step")
    p.add_argument("--plain", action="store_true", help="also profile our step with our CUDA kernels off")
    p.add_argument("--check-only", action="store_true", help="only compare our block kernels with the plain path")
    p.add_argument("--torch-compile", nargs="*", type=int, default=None, metavar="SIZE",
                   help="also diffusers under torch.compile (default mode) at these sizes (~70-110 s to compile each)")
    return p.parse_args(argv)


def profile(run_step: Callable[[], None], steps: int) -> Tuple[Dict[str, List[float]], float]:
    """{kernel name: [µs per launch]}, wall seconds per step."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run_step()
    run_step()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        wall = (time.perf_counter() - start) / steps
    torch.cuda.synchronize()
    kernels: Dict[str, List[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name].append(e.time_range.elapsed_us())
    return kernels, wall


def report(side: str, kernels: Dict[str, List[float]], wall: float, steps: int, top: int) -> None:
    busy = sum(sum(v) for v in kernels.values()) / steps / 1e3
    launches = sum(len(v) for v in kernels.values()) / steps
    print(f"\n## {side}: wall {wall * 1e3:.1f} ms per step, GPU busy {busy:.1f} ms, {launches:.0f} kernels per step")
    groups: Dict[str, List[float]] = defaultdict(list)
    for name, times in kernels.items():
        groups[group_of(name)].extend(times)
    print(f"{'group':44s} {'ms/step':>8s} {'launches':>9s} {'µs each':>8s}")
    for g, times in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        print(f"{g:44s} {sum(times) / steps / 1e3:8.2f} {len(times) / steps:9.0f} {sum(times) / len(times):8.1f}")
    print(f"top {top} kernels:")
    for name, times in sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"  {sum(times) / steps / 1e3:7.2f} ms {len(times) / steps:5.0f}×  {name[:110]}")
    # a launch-bound step is explained by its many small kernels, not its longest ones
    print(f"most launched {top}:")
    for name, times in sorted(kernels.items(), key=lambda kv: -len(kv[1]))[:top]:
        print(f"  {len(times) / steps:5.0f}× {sum(times) / len(times):7.1f} µs  {name[:110]}")


CHECK_BOUND = 2e-2  # bf16: the plain path rounds after every op, the kernels once


def check_block_kernels(hidden: int, heads: int, size: int, t5_tokens: int, calls: int = 16) -> float:
    """Our CUDA kernels (models/block_kernels.py, models/joint_heads.py) against the plain MLX
    path, each as the joint block calls it (CFG batch 2, both streams): max|Δ| / max|plain| and
    µs per call (--calls queued, then evaluated); returns the largest error."""
    from sd35_mlx.backend import KERNELS
    from sd35_mlx.models import block_kernels as bk
    from sd35_mlx.models import joint_heads as jh
    from sd35_mlx.models.mmdit_blocks import Attention

    print(f"\n## our kernels against the plain path (hidden {hidden}, {size}², batch 2)")
    print(f"{'op':52s} {'max|Δ|/max':>11s} {'plain µs':>9s} {'kernel µs':>10s}")
    bf16 = mx.bfloat16
    nx, nc = (size // 16) ** 2, 77 + t5_tokens

    def rand(*shape, scale=1.0, shift=0.0):
        return (scale * mx.random.normal(shape) + shift).astype(bf16)

    x, ctx = rand(2, nx, hidden, scale=4, shift=3), rand(2, nc, hidden, scale=4, shift=3)
    yx, yc = rand(2, nx, hidden), rand(2, nc, hidden)
    vx, vc = ([rand(2, 1, hidden) for _ in range(3)] for _ in range(2))
    fx, fc = rand(2, nx, 4 * hidden, scale=3), rand(2, nc, 4 * hidden, scale=3)
    ctx_attn, x_attn = (Attention(hidden, heads, qk_norm=True) for _ in range(2))
    for a in (ctx_attn, x_attn):
        a.q_norm.weight, a.k_norm.weight = (1 + 0.1 * mx.random.normal((hidden // heads,)) for _ in range(2))
        a.set_dtype(bf16)
    qkv_x, qkv_c = rand(2, nx, 3 * hidden, scale=3), rand(2, nc, 3 * hidden, scale=3)
    mx.eval(x, ctx, yx, yc, vx, vc, fx, fc, qkv_x, qkv_c, ctx_attn.parameters(), x_attn.parameters())
    cases = [
        ("norm_modulate_pair (attention inputs)", "block_elementwise",
         lambda: bk.norm_modulate_pair((x, vx[0], vx[1]), (ctx, vc[0], vc[1]))),
        ("residual_norm_modulate_pair (MLP inputs)", "block_elementwise",
         lambda: bk.residual_norm_modulate_pair((x, yx, *vx), (ctx, yc, *vc))),
        ("residual_norm_modulate (one stream)", "block_elementwise", lambda: bk.residual_norm_modulate(x, yx, *vx)),
        ("gelu_tanh pair (both fc1 outputs)", "block_elementwise", lambda: bk.gelu_tanh_pair(fx, fc)),
        ("joint_attention (heads, QK-norm, attention, split)", "joint_heads",
         lambda: jh.joint_attention(ctx_attn, qkv_c, x_attn, qkv_x)),
    ]  # fmt: skip
    worst = 0.0
    for label, switch, fn in cases:
        times, outs = {}, {}
        for on in (False, True):
            with KERNELS.overridden(**{switch: on}):
                out = fn()
                mx.eval(out)
                queued = [fn() for _ in range(calls)]
                start = time.perf_counter()
                mx.eval(queued)
                mx.synchronize()
                times[on] = (time.perf_counter() - start) / calls * 1e6
                outs[on] = [a.astype(mx.float32) for _, a in tree_flatten(out)]
        err = max((mx.abs(g - r).max() / mx.abs(r).max()).item() for g, r in zip(outs[True], outs[False]))
        worst = max(worst, err)
        print(f"{label:52s} {err:11.1e} {times[False]:9.1f} {times[True]:10.1f}")
    return worst


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    name, cfg = C.MODELS[args.model]
    dtype = mx.bfloat16
    print(f"{name}; {C.versions_line(C.machine_info('cuda'))}")
    worst = max(check_block_kernels(cfg.hidden_size, cfg.num_heads, size, args.t5_tokens) for size in args.size)
    if args.check_only:
        if not worst <= CHECK_BOUND:  # NaN fails too
            raise SystemExit(f"block kernels differ from the plain path by {worst:.2e} (bound {CHECK_BOUND})")
        return
    model = C.random_network("transformer", cfg, dtype, args.bits if args.bits < 16 else None)
    cond = C.random_conditioning(2, args.t5_tokens, dtype)
    for size in args.size:
        h = size // 8
        noise = mx.random.normal((1, h, h, 16)).astype(mx.float32)
        sigmas, sampler = C.schedule(args.steps + 3)

        def one_step(denoiser):
            def run():
                mx.eval(C.denoise_step(denoiser, noise, 0, sampler))
                mx.synchronize()

            return run

        denoiser, _ = C.make_denoiser(model, cond[1], cond[0], sigmas=sigmas)
        kernels, wall = profile(one_step(denoiser), args.steps)
        report(f"sd35_mlx {name} {size}²{'' if args.bits == 16 else f' {args.bits}-bit'}", kernels, wall, args.steps, args.top)
        if args.plain:
            from sd35_mlx.backend import KERNELS

            with KERNELS.overridden(block_elementwise=False, joint_heads=False):  # traced inside: plain
                plain, _ = C.make_denoiser(model, cond[1], cond[0], sigmas=sigmas)
                kernels, wall = profile(one_step(plain), args.steps)
            report(f"sd35_mlx {name} {size}², our CUDA kernels off", kernels, wall, args.steps, args.top)
    if args.torch:
        del model, denoiser
        mx.clear_cache()
        import torch_reference as TR

        with torch.no_grad():
            tmodel = TR.transformer(cfg, "cuda")
            for size in args.size:
                h = size // 8
                x = torch.randn(2, 16, h, h, device="cuda", dtype=torch.bfloat16)
                ctx = torch.randn(2, 77 + args.t5_tokens, 4096, device="cuda", dtype=torch.bfloat16)
                pooled = torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16)
                t = torch.full((2,), 500.0, device="cuda")

                def theirs():
                    tmodel(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)
                    torch.cuda.synchronize()

                kernels, wall = profile(theirs, args.steps)
                report(f"diffusers eager {name} {size}²", kernels, wall, args.steps, args.top)
                if size in (args.torch_compile or []):
                    compiled = torch.compile(tmodel)

                    def theirs_compiled():
                        compiled(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)
                        torch.cuda.synchronize()

                    kernels, wall = profile(theirs_compiled, args.steps)
                    report(f"diffusers + torch.compile {name} {size}²", kernels, wall, args.steps, args.top)


if __name__ == "__main__":
    main()
