"""Joint attention: the text and image streams' fused qkv projections -> one attention over
[context, image] tokens -> each stream's output rows, q and k RMS-normalised per stream.

    ctx_out, x_out = joint_attention(ctx_attn, qkv_c, x_attn, qkv_x)   # (B, Lc, H), (B, Lx, H)

In plain MLX this is a head split (transposed views), a copy before each RMSNorm, three
concatenations, the attention, a transpose back and a copy of each stream's rows: on an H100
about 0.75 ms per SD3.5 Large block at 1024², more than half of the attention itself. On CUDA
one kernel reads each qkv element once (16-byte vectors) and writes q, k and v in the
(B, N, heads, d) layout, whose views let cuDNN's attention write its output in that layout
too. The token order inside each batch row is free (no mask, no positional term inside
attention), so odd batch rows put their image tokens first: the image rows of batch pairs
(2p, 2p + 1) are then one contiguous block and the image stream's output projection reads
them in place; at CFG batch 2 the context rows are a strided view as well (MLX's addmm
flattens it with one copy, 3 µs a block on an H200; a batched GEMM reading it in place
measured no faster).
Every other backend (CPU, Metal) takes the plain path.
"""

from __future__ import annotations

import functools
import math
from typing import List, Tuple

import mlx.core as mx

from ..backend import KERNELS, backend_name, compute_in_float32
from .block_kernels import NORM_EPS
from .block_kernels_cuda import VEC16


def attention(q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """(B, heads, L, d) each -> (B, L, heads*d)."""
    dtype = q.dtype
    if compute_in_float32(dtype):  # the CPU's 16-bit attention has no fast kernel
        q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1])).astype(dtype)
    b, h, n, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, n, h * d)


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
    """q, k, v over [context, image] tokens in that order, each (B, heads, Lc + Lx, head_dim)."""
    cq, ck, cv = split_heads(ctx_attn, qkv_c)
    q, k, v = split_heads(x_attn, qkv_x)
    return tuple(mx.concatenate(pair, axis=2) for pair in ((cq, q), (ck, k), (cv, v)))  # type: ignore[return-value]


def joint_attention(ctx_attn, qkv_c: mx.array, x_attn, qkv_x: mx.array) -> Tuple[mx.array, mx.array]:
    """Attention over both streams' tokens -> (context rows (B, Lc, H), image rows (B, Lx, H))."""
    nc = qkv_c.shape[1]
    if _use_kernel(x_attn, qkv_c, qkv_x):
        out = attention(*_joint_heads_cuda(ctx_attn, qkv_c, x_attn, qkv_x, context_tokens=nc))
        return _split_alternating(out, nc)
    out = attention(*joint_heads(ctx_attn, qkv_c, x_attn, qkv_x))
    return out[:, :nc], out[:, nc:]


def _split_alternating(out: mx.array, nc: int) -> Tuple[mx.array, mx.array]:
    """Each stream's rows of an attention output whose odd batch rows hold [image, context]."""
    b, n, h = out.shape
    nx = n - nc
    if b == 2:  # CFG: the two context blocks are n + nx rows apart, a strided view (addmm flattens it with one copy)
        ctx = mx.as_strided(out, (2, nc, h), ((n + nx) * h, h, 1))
        return ctx, out.reshape(b * n, h)[nc : n + nx].reshape(b, nx, h)
    flat = out.reshape(b * n, h)
    ctx_rows: List[mx.array] = []
    image_rows: List[mx.array] = []
    for row in range(0, b, 2):
        start = row * n
        ctx_rows.append(flat[start : start + nc])
        if row + 1 < b:  # [ctx, image | image, ctx]: the two image blocks meet
            image_rows.append(flat[start + nc : start + n + nx])
            ctx_rows.append(flat[start + n + nx : start + 2 * n])
        else:
            image_rows.append(flat[start + nc : start + n])
    ctx = ctx_rows[0] if len(ctx_rows) == 1 else mx.concatenate(ctx_rows)  # one block: a view, no copy
    image = image_rows[0] if len(image_rows) == 1 else mx.concatenate(image_rows)
    return ctx.reshape(b, nc, h), image.reshape(b, nx, h)


def _use_kernel(x_attn, qkv_c: mx.array, qkv_x: mx.array) -> bool:
    if not (KERNELS.joint_heads and backend_name() == "cuda"):
        return False
    head_dim = qkv_x.shape[-1] // (3 * x_attn.num_heads)
    norms = "q_norm" in x_attn
    return head_dim == 64 and qkv_c.dtype == qkv_x.dtype and qkv_c.dtype in (mx.bfloat16, mx.float16, mx.float32) and (
        not norms or x_attn.q_norm.eps == NORM_EPS
    )


# L = 64 / V lanes per (batch, token, head) row, each holding V = 16 / sizeof(T) consecutive
# elements (one 16-byte load and store per part), 32 / L rows per warp; the RMS is a reduction
# over the row's L lanes. Lanes past the last row compute a valid row and store nothing, so
# every lane takes part in the shuffles. fp32 inside.
SOURCE = """
    constexpr int H = HEADS * 64;
    constexpr int N = NC + NX;
    constexpr int V = 16 / sizeof(T);
    constexpr int L = 64 / V;
    constexpr long long ROWS = (long long)(B) * N * HEADS;
    const long long thread = (long long)(blockIdx.x) * blockDim.x + threadIdx.x;
    const bool valid = thread / L < ROWS;
    const long long row = valid ? thread / L : ROWS - 1;
    const int sub = threadIdx.x % L;
    const int head = row % HEADS;
    const int n = (row / HEADS) % N;
    const int b = row / ((long long)(HEADS) * N);
    const bool ctx = n < NC;
    const T* src = ctx ? qkv_c + ((long long)(b) * NC + n) * 3 * H : qkv_x + ((long long)(b) * NX + (n - NC)) * 3 * H;
    const int pos = (b % 2 == 1 && NC > 0) ? (ctx ? NX + n : n - NC) : n;  // odd batch rows: [image, context]
    T* const outs[3] = {q, k, v};
    const long long dst = (((long long)(b) * N + pos) * HEADS + head) * 64 + sub * V;  // (B, N, heads, 64)
    for (int part = 0; part < 3; ++part) {
        const T* p = src + part * H + head * 64 + sub * V;
        const bool vec = ((reinterpret_cast<unsigned long long>(p) | reinterpret_cast<unsigned long long>(outs[part] + dst)) % 16) == 0;
        Vec16 raw, res;
        if (vec) {
            raw = *reinterpret_cast<const Vec16*>(p);
        } else {
            for (int k2 = 0; k2 < V; ++k2) reinterpret_cast<T*>(&raw)[k2] = p[k2];
        }
        const T* e = reinterpret_cast<const T*>(&raw);
        T* r = reinterpret_cast<T*>(&res);
        if (NORM && part < 2) {
            float ss = 0.0f;
            for (int k2 = 0; k2 < V; ++k2) ss += static_cast<float>(e[k2]) * static_cast<float>(e[k2]);
            for (int offset = L / 2; offset > 0; offset >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, offset);
            const float rs = rsqrtf(ss / 64.0f + EPS);
            const T* w = (part == 0 ? (ctx ? qn_c : qn_x) : (ctx ? kn_c : kn_x)) + sub * V;
            for (int k2 = 0; k2 < V; ++k2) {  // rounded as mx.fast.rms_norm: normalised, then weighted
                r[k2] = static_cast<T>(static_cast<float>(static_cast<T>(static_cast<float>(e[k2]) * rs)) * static_cast<float>(w[k2]));
            }
        } else {
            res = raw;
        }
        if (!valid) continue;
        if (vec) {
            *reinterpret_cast<Vec16*>(outs[part] + dst) = res;
        } else {
            for (int k2 = 0; k2 < V; ++k2) outs[part][dst + k2] = r[k2];
        }
    }
"""

INPUT_NAMES = ("qkv_c", "qkv_x", "qn_c", "kn_c", "qn_x", "kn_x")
OUTPUT_NAMES = ("q", "k", "v")
SOURCE = SOURCE.replace("EPS", f"{NORM_EPS:.9e}f")
HEADER = VEC16


@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="sd35_joint_heads",
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        source=SOURCE,
        header=HEADER,
    )


def _joint_heads_cuda(ctx_attn, qkv_c: mx.array, x_attn, qkv_x: mx.array, context_tokens: int):
    """The kernel; `context_tokens` = 0: image tokens only (`qkv_c` is then not read). With
    context tokens, odd batch rows hold [image, context] (see `_split_alternating`)."""
    b, nx, _ = qkv_x.shape
    nc = context_tokens
    heads = x_attn.num_heads
    norm = "q_norm" in x_attn
    dtype = qkv_x.dtype
    weights = [_weight(a, name, dtype) for a, name in ((ctx_attn, "q_norm"), (ctx_attn, "k_norm"), (x_attn, "q_norm"),
                                                       (x_attn, "k_norm"))]  # fmt: skip
    lanes_per_row = 64 * dtype.size // 16
    threads = b * (nc + nx) * heads * lanes_per_row
    per_block = 256
    shape = (b, nc + nx, heads, 64)
    q, k, v = _kernel()(
        inputs=[qkv_c, qkv_x, *weights],
        template=[("T", dtype), ("B", b), ("NC", nc), ("NX", nx), ("HEADS", heads), ("NORM", norm)],
        grid=(math.ceil(threads / per_block) * per_block, 1, 1),
        threadgroup=(per_block, 1, 1),
        output_shapes=[shape] * 3,
        output_dtypes=[dtype] * 3,
    )
    # (B, heads, N, 64) views of (B, N, heads, 64) data: attention() then returns contiguous rows
    return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _weight(attn, name: str, dtype: mx.Dtype) -> mx.array:
    """A norm's weight in `dtype`; ones where the model has no QK-norm (the kernel skips it)."""
    return attn[name].weight.astype(dtype) if name in attn else mx.ones((64,), dtype)
