"""The CUDA kernels behind block_kernels.py (called only on CUDA, for shapes `*_fits` accepts).

Norm kernel: one block per token row, sized so each thread holds at most 3 vectors (`norm_threads`;
4 for float32 rows of 4096); the row and its modulation vectors are read once, all loads first,
in 16-byte vectors kept in registers in the input type (chunk c = thread + THREADS i holds
elements c*V .. c*V + V - 1), the gated residual added (and written) first when asked; mean,
then the centred variance (not E[x²] - mean²: the residual stream's mean can be large against
its spread), both block reductions in float32. Rows of up to two streams share one launch:
blocks past the first stream's rows take the second. (One warp per row, loading the modulation
vectors after the reductions, ran at about 2.1 TB/s on an H200: a second memory round trip at
the end of every row.)
GELU kernel: V consecutive elements per thread in one 16-byte load and store, x·σ(2u) (the
same function as 0.5 x (1 + tanh u)) with the fast exponential for 16-bit types.
Any buffer not 16-byte aligned takes a scalar loop over the same elements.
"""

from __future__ import annotations

import functools
import math
from typing import List, Sequence, Tuple

import mlx.core as mx

NORM_EPS = 1e-6  # every SD3 LayerNorm and RMSNorm
DTYPES = (mx.bfloat16, mx.float16, mx.float32)
MAX_HIDDEN = 4096  # a row must fit in one block's registers (norm_threads: at most 4 vectors a thread)

VEC16 = "struct alignas(16) Vec16 { unsigned int words[4]; };  // one 16-byte load or store\n"

HEADER = VEC16 + r"""
template <typename T>
__device__ __forceinline__ void sd35_load(Vec16& dst, const T* src, bool vec) {
  if (vec) {
    dst = *reinterpret_cast<const Vec16*>(src);
  } else {
    T* e = reinterpret_cast<T*>(&dst);
    for (int k = 0; k < int(16 / sizeof(T)); ++k) e[k] = src[k];
  }
}

template <typename T>
__device__ __forceinline__ void sd35_store(T* dst, const Vec16& src, bool vec) {
  if (vec) {
    *reinterpret_cast<Vec16*>(dst) = src;
  } else {
    const T* e = reinterpret_cast<const T*>(&src);
    for (int k = 0; k < int(16 / sizeof(T)); ++k) dst[k] = e[k];
  }
}

__device__ __forceinline__ float sd35_warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

// Sum over the block's threads (THREADS a multiple of 32); `red` holds one float per warp.
template <int THREADS>
__device__ __forceinline__ float sd35_block_sum(float v, float* red) {
  v = sd35_warp_sum(v);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < THREADS / 32; ++w) total += red[w];
  return total;
}

// One row of H elements by one block of THREADS threads: [x_out = x + gate * y;]
// out = LN(x) * (1 + scale) + shift. Every load of the row (x, y and the modulation vectors) is
// issued before anything is computed or stored (VEC: one branch for the whole row), so one
// memory round trip serves the whole row.
template <typename T, int H, bool RES, bool VEC, int THREADS>
__device__ __forceinline__ void sd35_norm_row_as(const T* __restrict__ x, const T* __restrict__ y,
                                                 const T* __restrict__ gate, const T* __restrict__ shift,
                                                 const T* __restrict__ scale, T* __restrict__ x_out,
                                                 T* __restrict__ out) {
  constexpr int V = 16 / sizeof(T);
  constexpr int CHUNKS = H / V;
  constexpr int PER = (CHUNKS + THREADS - 1) / THREADS;
  __shared__ float red_mean[THREADS / 32];
  __shared__ float red_var[THREADS / 32];
  const int tid = threadIdx.x;
  Vec16 raw[PER], shift_raw[PER], scale_raw[PER];
  Vec16 y_raw[RES ? PER : 1], gate_raw[RES ? PER : 1];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = tid + THREADS * i;
    if (c < CHUNKS) {
      sd35_load<T>(raw[i], x + c * V, VEC);
      if constexpr (RES) {
        sd35_load<T>(y_raw[i], y + c * V, VEC);
        sd35_load<T>(gate_raw[i], gate + c * V, VEC);
      }
      sd35_load<T>(shift_raw[i], shift + c * V, VEC);
      sd35_load<T>(scale_raw[i], scale + c * V, VEC);
    }
  }
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = tid + THREADS * i;
    if (c >= CHUNKS) continue;
    T* e = reinterpret_cast<T*>(&raw[i]);
    if constexpr (RES) {
      const T* ye = reinterpret_cast<const T*>(&y_raw[i]);
      const T* ge = reinterpret_cast<const T*>(&gate_raw[i]);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        e[k] = static_cast<T>(static_cast<float>(e[k]) + static_cast<float>(ge[k]) * static_cast<float>(ye[k]));
      }
      sd35_store<T>(x_out + c * V, raw[i], VEC);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) sum += static_cast<float>(e[k]);
  }
  const float mean = sd35_block_sum<THREADS>(sum, red_mean) / H;
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    if (tid + THREADS * i < CHUNKS) {
      const T* e = reinterpret_cast<const T*>(&raw[i]);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float d = static_cast<float>(e[k]) - mean;
        ss += d * d;
      }
    }
  }
  const float rstd = rsqrtf(sd35_block_sum<THREADS>(ss, red_var) / H + EPS);
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = tid + THREADS * i;
    if (c >= CHUNKS) continue;
    Vec16 res;
    const T* e = reinterpret_cast<const T*>(&raw[i]);
    const T* sh = reinterpret_cast<const T*>(&shift_raw[i]);
    const T* sc = reinterpret_cast<const T*>(&scale_raw[i]);
    T* r = reinterpret_cast<T*>(&res);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      r[k] = static_cast<T>((static_cast<float>(e[k]) - mean) * rstd * (1.0f + static_cast<float>(sc[k])) +
                            static_cast<float>(sh[k]));
    }
    sd35_store<T>(out + c * V, res, VEC);
  }
}

// The row in 16-byte vectors when every buffer allows it, else element by element.
template <typename T, int H, bool RES, int THREADS>
__device__ __forceinline__ void sd35_norm_row(const T* x, const T* y, const T* gate, const T* shift,
                                              const T* scale, T* x_out, T* out) {
  unsigned long long addr = reinterpret_cast<unsigned long long>(x) | reinterpret_cast<unsigned long long>(shift) |
                            reinterpret_cast<unsigned long long>(scale) | reinterpret_cast<unsigned long long>(out);
  if constexpr (RES) {
    addr |= reinterpret_cast<unsigned long long>(y) | reinterpret_cast<unsigned long long>(gate) |
            reinterpret_cast<unsigned long long>(x_out);
  }
  if (addr % 16 == 0) {
    sd35_norm_row_as<T, H, RES, true, THREADS>(x, y, gate, shift, scale, x_out, out);
  } else {
    sd35_norm_row_as<T, H, RES, false, THREADS>(x, y, gate, shift, scale, x_out, out);
  }
}

template <typename T>
__device__ __forceinline__ float sd35_gelu(float v) {
  const float u = 0.7978845608028654f * (v + 0.044715f * v * v * v);  // √(2/π)
  const float t = fminf(-2.0f * u, 80.0f);  // exp(80) is finite: v / (1 + e) -> -0, never NaN
  if constexpr (sizeof(T) == 4) {
    return v / (1.0f + expf(t));
  } else {
    return __fdividef(v, 1.0f + __expf(t));
  }
}

template <typename T>
__device__ __forceinline__ void sd35_gelu_vector(const T* x, T* out, long long first, long long size) {
  constexpr int V = 16 / sizeof(T);
  const bool vec = first + V <= size &&
      ((reinterpret_cast<unsigned long long>(x + first) | reinterpret_cast<unsigned long long>(out + first)) % 16) == 0;
  if (vec) {
    Vec16 raw, res;
    sd35_load<T>(raw, x + first, true);
    const T* e = reinterpret_cast<const T*>(&raw);
    T* r = reinterpret_cast<T*>(&res);
#pragma unroll
    for (int k = 0; k < V; ++k) r[k] = static_cast<T>(sd35_gelu<T>(static_cast<float>(e[k])));
    sd35_store<T>(out + first, res, true);
  } else {
    for (long long i = first; i < first + V && i < size; ++i) out[i] = static_cast<T>(sd35_gelu<T>(static_cast<float>(x[i])));
  }
}
""".replace("EPS", f"{NORM_EPS:.9e}f")

_GELU_THREADS = 256


# ---- LayerNorm + modulate (+ the gated residual first) --------------------------------------------
def norm_fits(streams: Sequence[Tuple[mx.array, ...]], residual: bool) -> bool:
    """Whether the kernel takes these (x[, y, gate], shift, scale) streams (1 or 2, one dtype and width)."""
    if not 1 <= len(streams) <= 2 or any(len(s) != (5 if residual else 3) for s in streams):
        return False
    x0 = streams[0][0]
    if x0.ndim != 3 or x0.dtype not in DTYPES or x0.shape[-1] % 8 or x0.shape[-1] > MAX_HIDDEN:
        return False
    b, _, h = x0.shape
    rows = sum(s[0].shape[0] * s[0].shape[1] for s in streams)
    for x, *rest in streams:
        if x.ndim != 3 or x.shape[0] != b or x.shape[-1] != h or x.dtype != x0.dtype or x.size >= 2**31:
            return False
        vectors = rest[1:] if residual else rest  # gate, shift, scale: (B, 1, H); y like x
        if residual and (rest[0].shape != x.shape or rest[0].dtype != x.dtype):
            return False
        if any(v.shape != (b, 1, h) or v.dtype != x.dtype for v in vectors):
            return False
    return rows * norm_threads(h, x0.dtype) < 2**31  # one block per row: the thread index fits


def norm_threads(hidden: int, dtype: mx.Dtype) -> int:
    """Threads per row: a multiple of 32 giving each at most 3 16-byte vectors, capped at 256
    (float32 rows of MAX_HIDDEN then hold 4 a thread)."""
    chunks = hidden * dtype.size // 16
    return min(256, 32 * math.ceil(math.ceil(chunks / 3) / 32))


def norm_modulate(streams: Sequence[Tuple[mx.array, ...]], residual: bool) -> List[mx.array]:
    """[h per stream], or with `residual` [x_new, h per stream]."""
    x0 = streams[0][0]
    b, _, h = x0.shape
    threads = norm_threads(h, x0.dtype)
    shapes, template = [], [("T", x0.dtype), ("H", h), ("RES", residual), ("THREADS", threads)]
    for i, s in enumerate(streams):
        x = s[0]
        template += [(f"ROWS{i}", x.shape[0] * x.shape[1]), (f"N{i}", x.shape[1])]
        shapes += [x.shape] * (2 if residual else 1)
    rows = sum(x.shape[0] * x.shape[1] for x, *_ in streams)
    return _norm_kernel(len(streams), residual)(
        inputs=[a for s in streams for a in s],
        template=template,
        grid=(rows * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=shapes,
        output_dtypes=[x0.dtype] * len(shapes),
    )


@functools.cache
def _norm_kernel(streams: int, residual: bool):
    inputs, outputs, source = norm_source(streams, residual)
    return mx.fast.cuda_kernel(
        name=f"sd35_norm_modulate{'_residual' if residual else ''}{'_pair' if streams == 2 else ''}",
        input_names=inputs, output_names=outputs, source=source, header=HEADER,
    )  # fmt: skip


def norm_source(streams: int, residual: bool) -> Tuple[List[str], List[str], str]:
    """(input names, output names, kernel body) of the norm kernel for 1 or 2 streams."""
    inputs, outputs, body = [], [], []
    body.append("const long long row = blockIdx.x;")
    start = "0"
    for i in range(streams):
        names = [f"x{i}", f"y{i}", f"gate{i}", f"shift{i}", f"scale{i}"] if residual else [f"x{i}", f"shift{i}", f"scale{i}"]
        inputs += names
        outputs += [f"x_out{i}", f"out{i}"] if residual else [f"out{i}"]
        y, gate, x_out = (f"y{i} + r * H", f"gate{i} + b * H", f"x_out{i} + r * H") if residual else ("nullptr",) * 3
        body.append(
            f"if (row >= {start} && row < {start} + ROWS{i}) {{\n"  # a block's branch: the whole block takes it
            f"  const long long r = row - ({start});\n"
            f"  const long long b = r / N{i};\n"
            f"  sd35_norm_row<T, H, RES, THREADS>(x{i} + r * H, {y}, {gate}, shift{i} + b * H, scale{i} + b * H,\n"
            f"                                   {x_out}, out{i} + r * H);\n"
            "  return;\n"
            "}"
        )
        start = f"{start} + ROWS{i}"
    return inputs, outputs, "\n".join(body)


# ---- tanh GELU -----------------------------------------------------------------------------------
def gelu_fits(inputs: Sequence[mx.array]) -> bool:
    return (
        1 <= len(inputs) <= 2
        and all(a.dtype in DTYPES and a.dtype == inputs[0].dtype and a.size < 2**31 for a in inputs)
        and sum(math.ceil(a.size * a.dtype.size / 16) for a in inputs) < 2**31
    )


def gelu_tanh(inputs: Sequence[mx.array]) -> List[mx.array]:
    per_thread = 16 // inputs[0].dtype.size
    template = [("T", inputs[0].dtype)]
    threads = 0
    for i, a in enumerate(inputs):
        template += [(f"SIZE{i}", a.size), (f"THREADS{i}", math.ceil(a.size / per_thread))]
        threads += math.ceil(a.size / per_thread)
    return _gelu_kernel(len(inputs))(
        inputs=list(inputs),
        template=template,
        grid=(math.ceil(threads / _GELU_THREADS) * _GELU_THREADS, 1, 1),
        threadgroup=(_GELU_THREADS, 1, 1),
        output_shapes=[a.shape for a in inputs],
        output_dtypes=[a.dtype for a in inputs],
    )


@functools.cache
def _gelu_kernel(count: int):
    inputs, outputs, source = gelu_source(count)
    return mx.fast.cuda_kernel(name=f"sd35_gelu_tanh{'_pair' if count == 2 else ''}", input_names=inputs,
                               output_names=outputs, source=source, header=HEADER)  # fmt: skip


def gelu_source(count: int) -> Tuple[List[str], List[str], str]:
    """(input names, output names, kernel body) of the GELU kernel for 1 or 2 arrays."""
    body = ["const long long t = (long long)(blockIdx.x) * blockDim.x + threadIdx.x;", "constexpr int V = 16 / sizeof(T);"]
    start = "0"
    for i in range(count):
        body.append(
            f"if (t >= {start} && t < {start} + THREADS{i}) {{\n"
            f"  sd35_gelu_vector<T>(x{i}, out{i}, (t - ({start})) * V, SIZE{i});\n"
            "  return;\n"
            "}"
        )
        start = f"{start} + THREADS{i}"
    return [f"x{i}" for i in range(count)], [f"out{i}" for i in range(count)], "\n".join(body)
