"""The joint block's elementwise work: LayerNorm + adaLN modulation, and the tanh GELU.

    h = norm_modulate(x, shift, scale)   # LayerNorm(x) * (1 + scale) + shift, no affine
    y = gelu_tanh(fc1_out)               # 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))

On CUDA each is one kernel of ours. Profiled on an H200 (benchmarks/profile_kernels.py, SD3.5
Medium 1024² step): MLX's LayerNorm took 51 µs per call where torch's takes 15 µs, the
modulation after it was a second pass over the tokens, and the compiled GELU (with `x**3`
as a power) ran at 125 µs per call, ~2.5× its memory traffic: together ~12 ms of a 62 ms
step. The kernels read their input once, compute in float32 and round once; results are
within a bf16 rounding step of the plain path (the plain path rounds after every op).
Every other backend (CPU, Metal) and any unusual shape take the plain path.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx
import mlx.nn as nn

from ..backend import KERNELS, backend_name

NORM_EPS = 1e-6  # every SD3 LayerNorm and RMSNorm
_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def layer_norm(x: mx.array) -> mx.array:
    """LayerNorm without affine parameters (every norm of the MMDiT)."""
    return mx.fast.layer_norm(x, None, None, NORM_EPS)


def modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    return x * (1 + scale) + shift


def norm_modulate(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    """modulate(layer_norm(x), shift, scale) for x (B, N, H) and shift, scale (B, 1, H)."""
    if _norm_kernel_fits(x, shift, scale):
        return _norm_modulate_cuda(x, shift, scale)
    return modulate(layer_norm(x), shift, scale)


def gelu_tanh(x: mx.array) -> mx.array:
    """The tanh approximation of GELU (diffusers' "gelu-approximate", T5's gelu_new)."""
    if KERNELS.block_elementwise and backend_name() == "cuda" and x.dtype in _DTYPES and x.size < 2**31:
        return _gelu_cuda(x)
    return nn.gelu_approx(x)


def _norm_kernel_fits(x: mx.array, shift: mx.array, scale: mx.array) -> bool:
    if not (KERNELS.block_elementwise and backend_name() == "cuda"):
        return False
    # H a multiple of 8 (whole 16-byte vectors of 16-bit values) and small enough for registers
    if x.ndim != 3 or x.dtype not in _DTYPES or x.shape[-1] % 8 or x.shape[-1] > 4096 or x.size >= 2**31:
        return False
    b, _, h = x.shape
    return all(m.shape == (b, 1, h) and m.dtype == x.dtype for m in (shift, scale))


# One warp per token row: the row is read once, in 16-byte vectors (chunk c = lane + 32 i holds
# elements c*V .. c*V + V - 1) kept in registers; mean, then the centred variance (not
# E[x²] - mean²: the residual stream's mean can be large against its spread), both warp
# reductions in float32. A row of H = 1536 or 2432 bf16 is 16-byte aligned whenever the
# buffers are; the scalar loop covers any that are not.
_NORM_SOURCE = """
    constexpr int V = 16 / sizeof(T);
    constexpr int CHUNKS = H / V;
    constexpr int PER_LANE = (CHUNKS + 31) / 32;
    const long long row = (long long)(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= ROWS) return;  // whole warps: rows are warp-aligned
    const int lane = threadIdx.x % 32;
    const int b = row / N;
    const T* src = x + row * H;
    const T* sh = shift + (long long)(b) * H;
    const T* sc = scale + (long long)(b) * H;
    T* dst = out + row * H;
    const bool vec = ((reinterpret_cast<unsigned long long>(src) | reinterpret_cast<unsigned long long>(dst) |
                       reinterpret_cast<unsigned long long>(sh) | reinterpret_cast<unsigned long long>(sc)) % 16) == 0;
    float v[PER_LANE * V];
    float sum = 0.0f;
    for (int i = 0; i < PER_LANE; ++i) {
        const int c = lane + 32 * i;
        if (c < CHUNKS) {
            if (vec) {
                const Vec16 raw = *reinterpret_cast<const Vec16*>(src + c * V);
                const T* e = reinterpret_cast<const T*>(&raw);
                for (int k = 0; k < V; ++k) v[i * V + k] = static_cast<float>(e[k]);
            } else {
                for (int k = 0; k < V; ++k) v[i * V + k] = static_cast<float>(src[c * V + k]);
            }
            for (int k = 0; k < V; ++k) sum += v[i * V + k];
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, offset);
    const float mean = sum / H;
    float ss = 0.0f;
    for (int i = 0; i < PER_LANE; ++i) {
        if (lane + 32 * i < CHUNKS) {
            for (int k = 0; k < V; ++k) {
                const float d = v[i * V + k] - mean;
                ss += d * d;
            }
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, offset);
    const float rstd = rsqrtf(ss / H + EPS);
    for (int i = 0; i < PER_LANE; ++i) {
        const int c = lane + 32 * i;
        if (c >= CHUNKS) continue;
        Vec16 shift_raw, scale_raw, res;
        const T* shv;
        const T* scv;
        if (vec) {
            shift_raw = *reinterpret_cast<const Vec16*>(sh + c * V);
            scale_raw = *reinterpret_cast<const Vec16*>(sc + c * V);
            shv = reinterpret_cast<const T*>(&shift_raw);
            scv = reinterpret_cast<const T*>(&scale_raw);
        } else {
            shv = sh + c * V;
            scv = sc + c * V;
        }
        T* r = reinterpret_cast<T*>(&res);
        for (int k = 0; k < V; ++k) {
            r[k] = static_cast<T>((v[i * V + k] - mean) * rstd * (1.0f + static_cast<float>(scv[k])) +
                                  static_cast<float>(shv[k]));
        }
        if (vec) {
            *reinterpret_cast<Vec16*>(dst + c * V) = res;
        } else {
            for (int k = 0; k < V; ++k) dst[c * V + k] = r[k];
        }
    }
"""

# V consecutive elements per thread in one 16-byte load and store (scalar where unaligned or
# at the end).
_GELU_SOURCE = """
    constexpr int V = 16 / sizeof(T);
    const long long first = ((long long)(blockIdx.x) * blockDim.x + threadIdx.x) * V;
    if (first >= SIZE) return;
    const bool vec = first + V <= SIZE &&
        ((reinterpret_cast<unsigned long long>(x) | reinterpret_cast<unsigned long long>(out)) % 16) == 0;
    Vec16 raw, res;
    const T* e = reinterpret_cast<const T*>(&raw);
    T* r = reinterpret_cast<T*>(&res);
    if (vec) {
        raw = *reinterpret_cast<const Vec16*>(x + first);
    }
    for (int k = 0; k < V; ++k) {
        if (!vec && first + k >= SIZE) break;
        const float v = static_cast<float>(vec ? e[k] : x[first + k]);
        const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);  // √(2/π)
        const T g = static_cast<T>(0.5f * v * (1.0f + tanhf(u)));
        if (vec) {
            r[k] = g;
        } else {
            out[first + k] = g;
        }
    }
    if (vec) {
        *reinterpret_cast<Vec16*>(out + first) = res;
    }
"""


_HEADER = "struct alignas(16) Vec16 { unsigned int words[4]; };  // one 16-byte load or store\n"


@functools.cache
def _norm_kernel():
    return mx.fast.cuda_kernel(
        name="sd35_norm_modulate",
        input_names=["x", "shift", "scale"],
        output_names=["out"],
        source=_NORM_SOURCE.replace("EPS", f"{NORM_EPS:.9e}f"),
        header=_HEADER,
    )


@functools.cache
def _gelu_kernel():
    return mx.fast.cuda_kernel(name="sd35_gelu_tanh", input_names=["x"], output_names=["out"], source=_GELU_SOURCE,
                               header=_HEADER)


def _norm_modulate_cuda(x: mx.array, shift: mx.array, scale: mx.array) -> mx.array:
    b, n, h = x.shape
    rows = b * n
    warps_per_block = 4
    blocks = math.ceil(rows / warps_per_block)
    (out,) = _norm_kernel()(
        inputs=[x, shift, scale],
        template=[("T", x.dtype), ("ROWS", rows), ("N", n), ("H", h)],
        grid=(blocks * warps_per_block * 32, 1, 1),
        threadgroup=(warps_per_block * 32, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    return out


def _gelu_cuda(x: mx.array) -> mx.array:
    threads, per_thread = 256, 16 // x.dtype.size
    (out,) = _gelu_kernel()(
        inputs=[x],
        template=[("T", x.dtype), ("SIZE", x.size)],
        grid=(math.ceil(x.size / (threads * per_thread)) * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    return out
