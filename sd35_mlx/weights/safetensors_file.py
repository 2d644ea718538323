"""Reading safetensors files: the header is validated before any tensor is touched.

Tensors come back as lazy `mx.array`s from `mx.load` (bf16 stays bf16; nothing is
routed through numpy), so only what a network uses is ever read from disk. They are read on
MLX's default stream. Reading on the CPU stream instead is 2.5-3× faster on CUDA hosts
(benchmarks/bench_weight_read.py: 3.2-4.0 against 1.3 GB/s on the H200's host), but a fresh
CLI run's first step then went from 3.3 to 12.9 s and its whole first image from 14.8 to
26.0 s (docs/benchmarks.md, H200): most likely because MLX puts CPU-stream arrays in CUDA
managed memory, which the step's first kernels pull over page by page. The loaders keep the
default stream.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import mlx.core as mx

from ..errors import WeightFileError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: Tuple[int, ...]


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightFileError(
            f"{path}: refusing to read a pickle checkpoint ({path.suffix}). Pickle files can run "
            "arbitrary code when loaded. Use the .safetensors release of the model, or convert "
            "the file yourself in a trusted environment (e.g. with safetensors.torch.save_file)."
        )


def read_header(path: str | os.PathLike) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Return ({key: TensorInfo}, metadata) after checking the file is whole.

    Each file's header is parsed once: finding the layout, picking shards and loading all ask
    for it, so the result is kept per (file, size, modification time); a file that changes
    is read again. The returned mappings are shared: do not modify them."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such weight file")
    stat = path.stat()
    return _read_header(path.absolute(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=512)
def _read_header(path: Path, size: int, _mtime_ns: int) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightFileError(f"{path}: truncated ({size} bytes): not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise WeightFileError(
                f"{path}: corrupt or truncated safetensors header (claims {n} bytes, file has "
                f"{size}). Download the file again."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightFileError(f"{path}: corrupt safetensors header ({e}). Download it again.")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    infos: Dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightFileError(f"{path}: corrupt header entry for tensor '{key}'")
        expected = math.prod(shape) * _DTYPE_BYTES.get(dtype, 0)
        if dtype in _DTYPE_BYTES and end - start != expected:
            raise WeightFileError(f"{path}: tensor '{key}' has {end - start} bytes, expected {expected}")
        if end > data_size:
            raise WeightFileError(
                f"{path}: truncated: tensor '{key}' ends at byte {end} of the data section but the "
                f"file holds only {data_size}. The download or copy was cut short; fetch it again."
            )
        infos[key] = TensorInfo(dtype, shape)
    return infos, metadata


def lazy_tensors(path: str | os.PathLike) -> Dict[str, mx.array]:
    """The tensors of a safetensors file as lazy arrays (why the default stream: the module
    docstring). No validation: see `load_tensors`."""
    return dict(mx.load(str(path)))


def load_tensors(path: str | os.PathLike) -> Dict[str, mx.array]:
    """Validate `path`, then return its tensors as lazy MLX arrays."""
    infos, _ = read_header(path)
    if not infos:
        return {}
    try:
        return lazy_tensors(path)
    except Exception as e:  # mx.load's own messages name neither file nor cause clearly
        raise WeightFileError(f"{path}: cannot be read as safetensors ({e})") from e
