"""Joint attention inputs: the text and image streams' fused qkv projections -> q, k, v over
[context, image] tokens, each (B, heads, N, head_dim), q and k RMS-normalised per stream.

In plain MLX this is a head split (transposed views), a copy before each RMSNorm, three
concatenations and, after attention, a transpose back: on an H100 about 0.75 ms per SD3.5
Large block at 1024², more than half of the attention itself. On CUDA one kernel reads each
qkv element once and writes q, k and v in the (B, N, heads, d) layout; the views it returns
let cuDNN's attention write its output in that layout too, so the transpose back is free.
Every other backend (CPU, Metal) takes the plain path.
"""

from __future__ import annotations

import functools
from typing import Tuple

import mlx.core as mx

from ..backend import KERNELS, backend_name
from .block_kernels import NORM_EPS


def split_heads(attn, qkv: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
    """(B, L, 3H) -> q, k, v of shape (B, heads, L, head_dim), q and k normalised if `attn` has norms."""
    b, n, three_h = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, attn.num_heads, three_h // (3 * attn.num_heads)).transpose(2, 0, 3, 1, 4)
    if "q_norm" in attn:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def heads(attn, qkv: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
    """`split_heads` of one stream (MMDiT-X's image-only attention); the kernel on CUDA."""
    if _use_kernel(attn, qkv, qkv):
        return _joint_heads_cuda(attn, qkv, attn, qkv, context_tokens=0)
    return split_heads(attn, qkv)


def joint_heads(ctx_attn, qkv_c: mx.array, x_attn, qkv_x: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
    """q, k, v over [context, image] tokens, each (B, heads, Lc + Lx, head_dim)."""
    if _use_kernel(x_attn, qkv_c, qkv_x):
        return _joint_heads_cuda(ctx_attn, qkv_c, x_attn, qkv_x, context_tokens=qkv_c.shape[1])
    cq, ck, cv = split_heads(ctx_attn, qkv_c)
    q, k, v = split_heads(x_attn, qkv_x)
    return tuple(mx.concatenate(pair, axis=2) for pair in ((cq, q), (ck, k), (cv, v)))  # type: ignore[return-value]


def _use_kernel(x_attn, qkv_c: mx.array, qkv_x: mx.array) -> bool:
    if not (KERNELS.joint_heads and backend_name() == "cuda"):
        return False
    head_dim = qkv_x.shape[-1] // (3 * x_attn.num_heads)
    norms = "q_norm" in x_attn
    return head_dim == 64 and qkv_c.dtype == qkv_x.dtype and qkv_c.dtype in (mx.bfloat16, mx.float16, mx.float32) and (
        not norms or x_attn.q_norm.eps == NORM_EPS
    )


# One warp per (batch, token, head): lane j holds elements j and j + 32 of the 64-wide head,
# so loads and stores are coalesced and the RMS is a warp reduction. fp32 inside.
_SOURCE = """
    constexpr int H = HEADS * 64;
    constexpr int N = NC + NX;
    const long long row = (long long)(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= (long long)(B) * N * HEADS) return;  // whole warps: rows are warp-aligned
    const int lane = threadIdx.x % 32;
    const int head = row % HEADS;
    const int n = (row / HEADS) % N;
    const int b = row / ((long long)(HEADS) * N);
    const bool ctx = n < NC;
    const T* src = ctx ? qkv_c + ((long long)(b) * NC + n) * 3 * H : qkv_x + ((long long)(b) * NX + (n - NC)) * 3 * H;
    const long long out = (((long long)(b) * N + n) * HEADS + head) * 64;  // (B, N, heads, 64)
    for (int part = 0; part < 3; ++part) {
        const T* p = src + part * H + head * 64;
        float v0 = static_cast<float>(p[lane]);
        float v1 = static_cast<float>(p[lane + 32]);
        if (NORM && part < 2) {
            float ss = v0 * v0 + v1 * v1;
            for (int offset = 16; offset > 0; offset >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, offset);
            const float r = rsqrtf(ss / 64.0f + EPS);
            const T* w = part == 0 ? (ctx ? qn_c : qn_x) : (ctx ? kn_c : kn_x);
            v0 = static_cast<float>(static_cast<T>(v0 * r)) * static_cast<float>(w[lane]);  // rounded as mx.fast.rms_norm
            v1 = static_cast<float>(static_cast<T>(v1 * r)) * static_cast<float>(w[lane + 32]);
        }
        T* dst = part == 0 ? q : (part == 1 ? k : v);
        dst[out + lane] = static_cast<T>(v0);
        dst[out + lane + 32] = static_cast<T>(v1);
    }
"""

@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="sd35_joint_heads",
        input_names=["qkv_c", "qkv_x", "qn_c", "kn_c", "qn_x", "kn_x"],
        output_names=["q", "k", "v"],
        source=_SOURCE.replace("EPS", f"{NORM_EPS:.9e}f"),
    )


def _joint_heads_cuda(ctx_attn, qkv_c: mx.array, x_attn, qkv_x: mx.array, context_tokens: int):
    """The kernel; `context_tokens` = 0: image tokens only (`qkv_c` is then not read)."""
    b, nx, _ = qkv_x.shape
    nc = context_tokens
    heads = x_attn.num_heads
    norm = "q_norm" in x_attn
    dtype = qkv_x.dtype
    weights = [_weight(a, name, dtype) for a, name in ((ctx_attn, "q_norm"), (ctx_attn, "k_norm"), (x_attn, "q_norm"),
                                                       (x_attn, "k_norm"))]  # fmt: skip
    rows = b * (nc + nx) * heads
    warps_per_block = 8
    blocks = (rows + warps_per_block - 1) // warps_per_block
    shape = (b, nc + nx, heads, 64)
    q, k, v = _kernel()(
        inputs=[qkv_c, qkv_x, *weights],
        template=[("T", dtype), ("B", b), ("NC", nc), ("NX", nx), ("HEADS", heads), ("NORM", norm)],
        grid=(blocks * warps_per_block * 32, 1, 1),
        threadgroup=(warps_per_block * 32, 1, 1),
        output_shapes=[shape] * 3,
        output_dtypes=[dtype] * 3,
    )
    # (B, heads, N, 64) views of (B, N, heads, 64) data: attention() then returns contiguous rows
    return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _weight(attn, name: str, dtype: mx.Dtype) -> mx.array:
    """A norm's weight in `dtype`; ones where the model has no QK-norm (the kernel skips it)."""
    return attn[name].weight.astype(dtype) if name in attn else mx.ones((64,), dtype)
