"""Quantized layers at close to 16-bit speed (what they cost, and why: docs/performance.md).

`mx.quantized_matmul` is the right kernel when few rows pass through a layer (it reads
4-/8-bit weights: the matmul is memory-bound), but at the MMDiT's token counts (thousands
of rows per step) it is much slower than a 16-bit matmul on some backends (measured: 2.2–2.5×
slower on an H100 with MLX 0.32.4 CUDA, 11–26× on a CPU at bf16). There, dequantizing the
layer's weight just before its matmul is cheaper: the weight stays quantized in memory and
each layer's full-precision copy lives only until its matmul has run (on a GPU, until the
command buffer / CUDA graph holding that matmul finishes: MLX's in-flight limits bound how
many such copies exist at once, see docs/performance.md).

    use_dequantized_matmul(transformer)        # in place; same parameters, same file format
    use_quantized_matmul(transformer)          # back to plain nn.QuantizedLinear

See benchmarks/bench_quantized_matmul.py for the measurements that set `min_rows`.
"""

from __future__ import annotations

import contextvars
import functools
import math
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from .backend import KERNELS, backend_name, compute_in_float32

# Rows (tokens × batch) from which dequantize-then-matmul is used, per backend. Measured
# with benchmarks/bench_quantized_matmul.py (docs/performance.md): on the CPU the quantized
# kernel is slower at every size; on CUDA (H100) dequantize-then-matmul is faster from
# 64–256 rows on. Metal is unmeasured here: the same threshold as CUDA until measured.
DEFAULT_MIN_ROWS = {"cpu": 1, "cuda": 256, "metal": 256}


def default_min_rows(device: Optional[mx.Device] = None) -> int:
    return DEFAULT_MIN_ROWS[backend_name(device)]


def dequantized_weight(layer: nn.QuantizedLinear, dtype: Optional[mx.Dtype] = None) -> mx.array:
    """The layer's weight (out, in) in full precision (`dtype`, default the scales' dtype).

    mx.dequantize, or on CUDA a kernel of ours for the common case (affine 4-/8-bit): MLX
    0.32's runs at 0.5-0.6 TB/s on an H100 (one byte per thread), and a step de-quantizes
    every weight. Not the same arithmetic as elementwise ops for mx.compile to fuse: on an
    H100 that ran at about half mx.dequantize's bandwidth."""
    w, scales, biases = layer["weight"], layer["scales"], layer.get("biases")
    dtype = dtype or scales.dtype
    if _use_dequantize_kernel(layer, dtype):
        return _dequantize_cuda(w, scales, biases, layer.group_size, layer.bits)
    return mx.dequantize(w, scales, biases, layer.group_size, layer.bits, mode=layer.mode, dtype=dtype)


def _use_dequantize_kernel(layer: nn.QuantizedLinear, dtype: mx.Dtype) -> bool:
    return (
        KERNELS.dequantize
        and backend_name() == "cuda"
        and layer.mode == "affine"
        and layer.bits in (4, 8)
        and layer.get("biases") is not None
        and layer["scales"].dtype == dtype
        and dtype in (mx.bfloat16, mx.float16, mx.float32)
    )


# One 32-bit word per thread (8 four-bit or 4 eight-bit values), written with one or two
# 16-byte stores; the same arithmetic as mx.dequantize (scale * q + bias in the output type).
DEQUANTIZE_HEADER = """
template <typename T, int BITS, int GROUP>
__device__ __forceinline__ void sd35_dequantize_word(const uint32_t* w, const T* scales, const T* biases,
                                                     T* out, long long idx) {
    constexpr int PER = 32 / BITS;
    constexpr unsigned int MASK = (1u << BITS) - 1u;
    const long long g = (idx * PER) / GROUP;
    const T scale = scales[g];
    const T bias = biases[g];
    const unsigned int word = w[idx];
    alignas(16) T vals[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        vals[i] = scale * static_cast<T>(static_cast<float>((word >> (BITS * i)) & MASK)) + bias;
    }
    T* dst = out + idx * PER;
    constexpr int BYTES = PER * sizeof(T);
    if constexpr (BYTES % 16 == 0) {
#pragma unroll
        for (int c = 0; c < BYTES / 16; ++c) reinterpret_cast<uint4*>(dst)[c] = reinterpret_cast<const uint4*>(vals)[c];
    } else {
        reinterpret_cast<uint2*>(dst)[0] = reinterpret_cast<const uint2*>(vals)[0];
    }
}
"""

DEQUANTIZE_SOURCE = """
    const long long idx = (long long)(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= WORDS) return;
    sd35_dequantize_word<T, BITS, GROUP>(w, scales, biases, out, idx);
"""


def dequantize_many_source(count: int) -> Tuple[List[str], List[str], str]:
    """(input names, output names, body) of one launch de-quantizing `count` weights:
    threads past the first weight's words take the next one."""
    inputs = [f"{n}{i}" for i in range(count) for n in ("w", "scales", "biases")]
    body = ["const long long idx = (long long)(blockIdx.x) * blockDim.x + threadIdx.x;"]
    start = "0"
    for i in range(count):
        body.append(
            f"if (idx >= {start} && idx < {start} + WORDS{i}) {{\n"
            f"  sd35_dequantize_word<T, BITS, GROUP>(w{i}, scales{i}, biases{i}, out{i}, idx - ({start}));\n"
            "  return;\n"
            "}"
        )
        start = f"{start} + WORDS{i}"
    return inputs, [f"out{i}" for i in range(count)], "\n".join(body)


@functools.cache
def _dequantize_kernel():
    return mx.fast.cuda_kernel(
        name="sd35_dequantize_affine",
        input_names=["w", "scales", "biases"],
        output_names=["out"],
        source=DEQUANTIZE_SOURCE,
        header=DEQUANTIZE_HEADER,
    )


def dense_shape(w: mx.array, bits: int) -> Tuple[int, int]:
    """(out, in) of the 16-bit weight a packed (out, in * bits / 32) uint32 weight holds."""
    return w.shape[0], w.shape[1] * 32 // bits


def _dequantize_cuda(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    words = w.size
    threads = 256
    (out,) = _dequantize_kernel()(
        inputs=[w, scales, biases],
        template=[("T", scales.dtype), ("BITS", bits), ("GROUP", group_size), ("WORDS", words)],
        grid=((words + threads - 1) // threads * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[dense_shape(w, bits)],
        output_dtypes=[scales.dtype],
    )
    return out


@functools.cache
def _dequantize_many_kernel(count: int):
    inputs, outputs, source = dequantize_many_source(count)
    return mx.fast.cuda_kernel(name=f"sd35_dequantize_{count}", input_names=inputs, output_names=outputs,
                               source=source, header=DEQUANTIZE_HEADER)  # fmt: skip


def dequantized_weights(layers: Sequence[nn.QuantizedLinear]) -> List[mx.array]:
    """Every layer's weight in its scales' dtype; on CUDA one launch for all of them when they
    share bits, group size and dtype (one kernel per block instead of one per layer), else
    one `dequantized_weight` each."""
    words = [l["weight"].size for l in layers]
    one_format = len({(l.bits, l.group_size, l["scales"].dtype) for l in layers}) == 1
    kernel = all(_use_dequantize_kernel(l, l["scales"].dtype) for l in layers)
    if len(layers) > 1 and one_format and kernel and sum(words) < 2**31:
        first, threads = layers[0], 256
        template = [("T", first["scales"].dtype), ("BITS", first.bits), ("GROUP", first.group_size)]
        template += [(f"WORDS{i}", n) for i, n in enumerate(words)]
        return _dequantize_many_kernel(len(layers))(
            inputs=[a for l in layers for a in (l["weight"], l["scales"], l["biases"])],
            template=template,
            grid=(math.ceil(sum(words) / threads) * threads, 1, 1),
            threadgroup=(threads, 1, 1),
            output_shapes=[dense_shape(l["weight"], l.bits) for l in layers],
            output_dtypes=[first["scales"].dtype] * len(layers),
        )
    return [dequantized_weight(l) for l in layers]


# The weights `dequantized_together` made for the layers running now, by layer identity.
_DENSE: contextvars.ContextVar[Dict[int, mx.array]] = contextvars.ContextVar("sd35_dense_weights", default={})


def quantized_layers(module: nn.Module, skip: Sequence[str] = ()) -> List[nn.QuantizedLinear]:
    """The quantized linear layers inside `module` (DequantizingLinear included) in a fixed
    order, leaving out those under a submodule named in `skip`."""
    return [m for name, m in sorted(module.named_modules(), key=lambda kv: kv[0])
            if isinstance(m, nn.QuantizedLinear) and not set(name.split(".")) & set(skip)]  # fmt: skip


def dense_bytes(layers: Sequence[nn.QuantizedLinear]) -> int:
    """What de-quantizing these layers together holds at once: their 16-bit weights."""
    return sum(math.prod(dense_shape(l["weight"], l.bits)) * l["scales"].dtype.size for l in layers)


@contextmanager
def dequantized_together(layers: Sequence[nn.QuantizedLinear], rows: int) -> Iterator[None]:
    """While inside, the DequantizingLinear ones of `layers` take their dense weights from one
    shared de-quantization (lazy: one kernel when the first of them runs) instead of one each.
    Only when every layer would de-quantize at `rows` rows (the fewest any of them sees); else
    nothing changes. The shared weights stay alive until the last of the layers has run: all
    of them at 16-bit at once."""
    used = [l for l in layers if isinstance(l, DequantizingLinear) and l.dense_dtype() is not None]
    if len(used) < 2 or any(rows < l.min_rows for l in used):
        yield
        return
    token = _DENSE.set({**_DENSE.get(), **{id(l): w for l, w in zip(used, dequantized_weights(used))}})
    try:
        yield
    finally:
        _DENSE.reset(token)


class DequantizingLinear(nn.QuantizedLinear):
    """An nn.QuantizedLinear (same parameters) that, for inputs of at least `min_rows`
    rows, dequantizes its weight and runs a dense matmul instead of `quantized_matmul`."""

    min_rows: int = 1

    @classmethod
    def from_quantized(cls, layer: nn.QuantizedLinear, min_rows: int) -> "DequantizingLinear":
        # Bypass __init__: it would draw and quantize a random weight of the full size.
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.group_size, new.bits, new.mode = layer.group_size, layer.bits, layer.mode
        new.min_rows = int(min_rows)
        for key, value in layer.items():  # weight, scales, [biases], [bias]: shared, not copied
            new[key] = value
        new.freeze()
        return new

    def dense_dtype(self) -> Optional[mx.Dtype]:
        """The dtype a shared de-quantization gives this layer (its scales'), or None where the
        layer computes in another dtype (the CPU's float32: see cpu_compute.py)."""
        dtype = self["scales"].dtype
        return None if compute_in_float32(dtype) else dtype

    def to_quantized(self) -> nn.QuantizedLinear:
        plain = nn.QuantizedLinear.__new__(nn.QuantizedLinear)
        nn.Module.__init__(plain)
        plain.group_size, plain.bits, plain.mode = self.group_size, self.bits, self.mode
        for key, value in self.items():
            plain[key] = value
        plain.freeze()
        return plain

    def __call__(self, x: mx.array) -> mx.array:
        rows = math.prod(x.shape[:-1])
        if rows < self.min_rows:
            return super().__call__(x)
        dtype = mx.float32 if compute_in_float32(x.dtype) else x.dtype  # the CPU: see cpu_compute.py
        shared = _DENSE.get().get(id(self))
        w = shared.astype(dtype) if shared is not None else dequantized_weight(self, dtype)
        xc = x.astype(dtype)
        y = mx.addmm(self["bias"].astype(dtype), xc, w.T) if "bias" in self else xc @ w.T
        return y.astype(x.dtype)


def use_dequantized_matmul(model: nn.Module, min_rows: Optional[int] = None) -> int:
    """Swap every nn.QuantizedLinear of `model` for a DequantizingLinear (in place, sharing
    the arrays). min_rows: None keeps the threshold of layers already swapped and gives new
    ones the backend's default (`default_min_rows`). Returns the number of quantized layers."""
    count = 0

    def convert(_path: str, module: nn.Module) -> nn.Module:
        nonlocal count
        if isinstance(module, DequantizingLinear):
            count += 1
            if min_rows is not None:
                module.min_rows = int(min_rows)
            return module
        if isinstance(module, nn.QuantizedLinear):
            count += 1
            return DequantizingLinear.from_quantized(module, default_min_rows() if min_rows is None else min_rows)
        return module

    leaves = tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module)
    if count:
        model.update_modules(leaves)
    return count


def use_quantized_matmul(model: nn.Module) -> int:
    """Undo `use_dequantized_matmul`: plain nn.QuantizedLinear layers again. Returns the count."""
    count = 0

    def convert(_path: str, module: nn.Module) -> nn.Module:
        nonlocal count
        if isinstance(module, DequantizingLinear):
            count += 1
            return module.to_quantized()
        return module

    leaves = tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module)
    if count:
        model.update_modules(leaves)
    return count


__all__ = [
    "DEFAULT_MIN_ROWS", "DequantizingLinear", "default_min_rows", "dense_bytes", "dense_shape", "dequantized_together",
    "dequantized_weight", "dequantized_weights", "quantized_layers",
    "use_dequantized_matmul", "use_quantized_matmul",
]  # fmt: skip
