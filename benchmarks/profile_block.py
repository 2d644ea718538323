"""Where a denoising step's time goes: one full-size joint block, taken apart.

    python benchmarks/profile_block.py --model large --size 1024 [--torch]

Times (median of --repeat after a warm-up, compiled like the pipeline's step) one joint block
of the model at its real shapes (CFG batch 2, 333 text tokens), and its parts:
- matmuls: the block's Linear layers alone, on inputs of their shapes;
- attention: `mx.fast.scaled_dot_product_attention` alone, on contiguous (B, heads, N, d);
- attention with our layout: q, k, v from the fused projections (transposed views, QK-norm),
  the [context, image] concatenation, attention and the transpose back;
- the rest (norms, modulation, gates, residuals, GELU) = plain block − matmuls − layout + attention;
- the fused CUDA layout (`sd35_mlx.models.joint_heads`) against the plain one, and two
  pure-MLX layout variants that were tried and not kept, with their max |difference|;
and with --torch the same matmuls and attention in PyTorch (bf16, SDPA) on the same card.
Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

from sd35_mlx.backend import KERNELS  # noqa: E402
from sd35_mlx.models import joint_heads as jh  # noqa: E402
from sd35_mlx.models.joint_heads import attention  # noqa: E402
from sd35_mlx.models.mmdit_blocks import JointBlock  # noqa: E402

TEXT_TOKENS = 333


def timed(fn, repeat: int) -> float:
    return C.time_calls(fn, C.mlx_sync, 2, repeat).median


def _split(qkv: mx.array, heads: int):
    """(B, n, 3H) -> q, k, v views of shape (B, n, heads, d)."""
    b, n, three_h = qkv.shape
    qkv = qkv.reshape(b, n, 3, heads, three_h // (3 * heads))
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _sdpa_bnhd(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Attention over (B, N, heads, d) inputs -> (B, N, heads * d); MLX CUDA writes the output
    in q's layout, so the transpose back is free there."""
    b, n, h, d = q.shape
    out = mx.fast.scaled_dot_product_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), scale=d**-0.5
    )
    return out.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def bnhd(block, qkv_x, qkv_c):
    heads = block.x.attn.num_heads
    q, k, v = _split(qkv_x, heads)
    cq, ck, cv = _split(qkv_c, heads)
    if "q_norm" in block.x.attn:
        q, k = block.x.attn.q_norm(q), block.x.attn.k_norm(k)
        cq, ck = block.context.attn.q_norm(cq), block.context.attn.k_norm(ck)
    return _sdpa_bnhd(*(mx.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v))))


def joint_qkv(block, qkv_x, qkv_c):
    heads = block.x.attn.num_heads
    n_ctx = qkv_c.shape[1]
    q, k, v = _split(mx.concatenate([qkv_c, qkv_x], axis=1), heads)
    if "q_norm" in block.x.attn:
        n = q.shape[1]

        def weight(name):
            c, x = getattr(block.context.attn, name).weight, getattr(block.x.attn, name).weight
            return mx.concatenate([mx.broadcast_to(c, (n_ctx, 1, c.size)), mx.broadcast_to(x, (n - n_ctx, 1, x.size))])

        eps = block.x.attn.q_norm.eps
        q = mx.fast.rms_norm(q, None, eps) * weight("q_norm")
        k = mx.fast.rms_norm(k, None, eps) * weight("k_norm")
    return _sdpa_bnhd(q, k, v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="large", choices=list(C.MODELS))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--torch", action="store_true")
    args = p.parse_args()
    name, cfg = C.MODELS[args.model]
    dt = mx.bfloat16
    hidden, heads = cfg.hidden_size, cfg.num_heads
    b, n_img, n_ctx = args.batch, (args.size // 16) ** 2, TEXT_TOKENS
    block = JointBlock(hidden, heads, qk_norm=cfg.qk_norm is not None, dual=False, pre_only=False)
    for attn in (block.x.attn, block.context.attn):  # distinct norm weights per stream
        if "q_norm" in attn:
            attn.q_norm.weight, attn.k_norm.weight = (1 + 0.1 * mx.random.normal((hidden // heads,)) for _ in range(2))
    block.set_dtype(dt)
    mx.eval(block.parameters())
    x = mx.random.normal((b, n_img, hidden)).astype(dt)
    ctx = mx.random.normal((b, n_ctx, hidden)).astype(dt)
    c = mx.random.normal((b, hidden)).astype(dt)
    mod = block.modulation(c)
    mx.eval(x, ctx, mod)
    rows = []

    with KERNELS.overridden(joint_heads=False, block_elementwise=False):
        run_block = mx.compile(lambda x, ctx: block(x, ctx, mod))
        rows.append(("joint block, plain MLX", timed(lambda: run_block(x, ctx), args.repeat)))
        plain_out = run_block(x, ctx)
    run_fused = mx.compile(lambda x, ctx: block(x, ctx, mod))
    fused_out = run_fused(x, ctx)
    err = max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item() for a, b in zip(plain_out, fused_out))
    scale = max(mx.abs(a.astype(mx.float32)).max().item() for a in plain_out)
    rows.append((f"joint block, our CUDA kernels (max|Δ|/max {err / scale:.1e})",
                 timed(lambda: run_fused(x, ctx), args.repeat)))  # fmt: skip

    linears = [(block.x.attn.qkv, x), (block.x.attn.proj, x), (block.x.mlp.fc1, x), (block.context.attn.qkv, ctx),
               (block.context.attn.proj, ctx), (block.context.mlp.fc1, ctx)]  # fmt: skip
    h4x = mx.random.normal((b, n_img, 4 * hidden)).astype(dt)
    h4c = mx.random.normal((b, n_ctx, 4 * hidden)).astype(dt)
    mx.eval(h4x, h4c)
    linears += [(block.x.mlp.fc2, h4x), (block.context.mlp.fc2, h4c)]
    run_mm = mx.compile(lambda: [lin(inp) for lin, inp in linears])
    t_matmuls = timed(run_mm, args.repeat)
    rows.append(("  matmuls (all 8 Linear layers)", t_matmuls))
    for label, (lin, inp) in zip(["x qkv", "x proj", "x fc1", "ctx qkv", "ctx proj", "ctx fc1", "x fc2", "ctx fc2"], linears):
        rows.append((f"    {label} {tuple(inp.shape)}→{lin.weight.shape[0]}", timed(lambda: lin(inp), args.repeat)))

    d = hidden // heads
    q = mx.random.normal((b, heads, n_img + n_ctx, d)).astype(dt)
    mx.eval(q)
    rows.append(("  attention alone (contiguous)", timed(lambda: attention(q, q, q), args.repeat)))

    qkv_x, qkv_c = block.x.attn.qkv(x), block.context.attn.qkv(ctx)
    mx.eval(qkv_x, qkv_c)

    def ours(qkv_x, qkv_c):  # the plain MLX path of joint_heads, whatever the backend
        q, k, v = jh.split_heads(block.x.attn, qkv_x)
        cq, ck, cv = jh.split_heads(block.context.attn, qkv_c)
        return attention(mx.concatenate([cq, q], 2), mx.concatenate([ck, k], 2), mx.concatenate([cv, v], 2))

    fused_layout = mx.compile(lambda a, c: jh.joint_attention(block.context.attn, c, block.x.attn, a))
    rows.append(("  attention with the fused layout (CUDA kernel)", timed(lambda: fused_layout(qkv_x, qkv_c), args.repeat)))
    run_ours = mx.compile(ours)
    t_ours = timed(lambda: run_ours(qkv_x, qkv_c), args.repeat)
    rows.append(("  attention with our layout (+QK-norm, concat)", t_ours))

    def tokens_first(qkv_x, qkv_c):
        qkv = mx.concatenate([qkv_c, qkv_x], axis=1)  # one copy instead of three
        bb, n, _ = qkv.shape
        q, k, v = qkv.reshape(bb, n, 3, heads, d).transpose(2, 0, 3, 1, 4)
        if "q_norm" in block.x.attn:  # (a real variant would norm each stream with its own weights)
            q, k = block.x.attn.q_norm(q), block.x.attn.k_norm(k)
        return attention(q, k, v)

    run_tf = mx.compile(tokens_first)
    rows.append(("  variant: concat tokens before the head split", timed(lambda: run_tf(qkv_x, qkv_c), args.repeat)))

    for label, variant in (("(B, N, heads, d) layout", bnhd), ("joint qkv, per-token norm weight", joint_qkv)):
        fn = mx.compile(lambda a, c, variant=variant: variant(block, a, c))
        err = mx.abs(fn(qkv_x, qkv_c).astype(mx.float32) - run_ours(qkv_x, qkv_c).astype(mx.float32)).max().item()
        rows.append((f"  variant: {label} (max|Δ| {err:.2g})", timed(lambda fn=fn: fn(qkv_x, qkv_c), args.repeat)))

    rest = rows[0][1] - t_matmuls - t_ours  # the plain block's
    rows.append(("  rest (norms, modulation, gates, GELU, residuals)", rest))

    if args.torch:
        import torch
        import torch.nn.functional as F

        def torch_timed(fn):
            return C.time_calls(fn, lambda _: torch.cuda.synchronize(), 2, args.repeat).median

        dev = "cuda"
        with torch.no_grad():
            tl = [(torch.nn.Linear(lin.weight.shape[1], lin.weight.shape[0]).to(dev, torch.bfloat16),
                   torch.randn(*inp.shape, device=dev, dtype=torch.bfloat16)) for lin, inp in linears]  # fmt: skip
            rows.append(("  torch: matmuls", torch_timed(lambda: [lin(i) for lin, i in tl])))
            tq = torch.randn(b, heads, n_img + n_ctx, d, device=dev, dtype=torch.bfloat16)
            rows.append(("  torch: SDPA (contiguous)", torch_timed(lambda: F.scaled_dot_product_attention(tq, tq, tq))))

    print(f"{name}, {args.size}², batch {b}, {n_img}+{n_ctx} tokens, hidden {hidden}, {heads} heads; "
          f"{C.versions_line(C.machine_info())}")  # fmt: skip
    print(f"{'part':58s} {'ms':>8s} {'x depth':>9s}")
    for label, sec in rows:
        print(f"{label:58s} {sec * 1e3:8.3f} {sec * 1e3 * cfg.depth:9.1f}")


if __name__ == "__main__":
    main()
