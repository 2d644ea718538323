"""Layer streaming: run T5-XXL with one block's weights in memory at a time.

T5-XXL is 9.5 GB at 16-bit (2.9 GB at 4-bit), more than a small machine can hold next to
anything else. Its 24 blocks run one after another, so only one has to be in memory:

    weights = t5_weights_provider(files, layout, hf_config)   # lazy, our names
    t5 = StreamedT5(None, weights)                           # config inferred from shapes
    hidden = t5(input_ids)                                   # same result as T5Encoder

Every call asks the provider for *fresh* lazy tensors (`mx.load` reads nothing until a
tensor is evaluated), then per block: build the block, load its tensors (quantize them on
the fly, or load already-quantized ones), run it, evaluate, drop it and `mx.clear_cache()`.
An evaluated array keeps its memory while anything references it, so the block's tensors
are popped out of the provider's dict before they are used: nothing outlives its block.

Peak ≈ the largest of (embedding table, one block) + activations, instead of the whole
encoder. The cost is reading the weights from disk on every call (see docs/memory.md).
Results are bit-identical to the loaded `T5Encoder` with the same dtype and quantization:
the same operations run on the same values, only one block at a time.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Set, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from .components import component_dtype
from .config import T5Config
from .errors import WeightFileError, WeightMappingError
from .models.t5 import T5Block, T5Encoder
from .quantize import QuantSpec, quantizable_layers
from .weights.mapping import NetworkLayout, apply_rules, cast_floating, check_against_model
from .weights.safetensors_file import lazy_tensors, load_tensors
from .weights.sources import ModelSources, resolve_sources

log = logging.getLogger(__name__)

# Returns lazy, never-evaluated tensors under our names (`tree_flatten(T5Encoder)` keys,
# maybe already quantized: `.weight` packed + `.scales` [+ `.biases`]). Called once per use.
WeightsProvider = Callable[[], Mapping[str, mx.array]]

STEM_KEYS = ("embed.weight", "relative_attention_bias.weight", "final_norm.weight")
# (bits, group size) of the modes without biases, to recognise them from tensor shapes
_FP_MODES = {(4, 32): "mxfp4", (8, 32): "mxfp8", (4, 16): "nvfp4"}


# ---- weights providers ------------------------------------------------------------------------
@dataclass(frozen=True)
class FileWeights:
    """A `WeightsProvider` reading safetensors files (shards are merged).

    layout: the checkpoint's layout (diffusers, Stability, single file): its rules map the
        names to ours. None: the files already hold our names (a converted folder); `prefix`
        then selects and strips the network's keys (e.g. "t5.").
    hf_config: the component's config.json, for what shapes do not show (T5's eps).
    """

    files: Tuple[Path, ...]
    layout: Optional[NetworkLayout] = None
    prefix: str = ""
    hf_config: Optional[dict] = None

    @property
    def description(self) -> str:
        return self.layout.name if self.layout is not None else "sd35_mlx names (converted)"

    def __call__(self) -> Dict[str, mx.array]:
        tensors: Dict[str, mx.array] = {}
        for f in self.files:
            tensors.update(lazy_tensors(f))  # headers only: nothing is read until evaluated
        if self.layout is None:
            return {k[len(self.prefix):]: v for k, v in tensors.items() if k.startswith(self.prefix)}
        lay = self.layout
        return apply_rules(
            tensors, lay.rules, layout=lay.name, files=[str(f) for f in self.files],
            prefix=lay.prefix, ignore=lay.ignore,
        )  # fmt: skip


def t5_weights_provider(
    files: Sequence[str | os.PathLike],
    layout: Optional[NetworkLayout] = None,
    hf_config: Optional[dict] = None,
    prefix: str = "",
) -> FileWeights:
    """A provider of T5 tensors from `files` (validated now: truncated/pickle files fail here).

    `layout` None means the files are in our names (converted), see `FileWeights`.
    """
    paths = tuple(Path(f) for f in files)
    for p in paths:
        load_tensors(p)  # checks the header and that every tensor's bytes are there
    return FileWeights(paths, layout, prefix, hf_config)


# ---- quantized tensors: what their shapes say ---------------------------------------------------
def _is_prequantized(weights: Mapping[str, mx.array]) -> bool:
    return any(k.endswith(".scales") for k in weights)


def _settings_from_shapes(weights: Mapping[str, mx.array], d_model: int) -> Tuple[int, int, str]:
    """(bits, group_size, mode) of already-quantized T5 tensors.

    A layer reading d_model inputs (qkv, wi_0, wi_1) gives both: packed words per row =
    d_model * bits / 32, scales per row = d_model / group_size.
    """
    for key in sorted(weights):
        m = re.fullmatch(r"(blocks\.\d+\.(attn\.qkv|ff\.wi_0|ff\.wi_1))\.scales", key)
        if not m:
            continue
        packed, scales = weights[m.group(1) + ".weight"].shape[1], weights[key].shape[1]
        bits, group = packed * 32 // d_model, d_model // scales
        if m.group(1) + ".biases" in weights:
            return bits, group, "affine"
        if (bits, group) in _FP_MODES:
            return bits, group, _FP_MODES[(bits, group)]
        break
    raise WeightMappingError(
        "cannot tell how these T5 tensors were quantized from their shapes; pass the "
        "QuantSpec the converted folder's config.json records"
    )


class _Shape:
    """Stands in for a tensor where only the shape is read (config inference)."""

    def __init__(self, shape: Tuple[int, ...]):
        self.shape = shape


def infer_streamed_config(
    weights: Mapping[str, mx.array], hf_config: Optional[dict] = None, quantize: Optional[QuantSpec] = None
) -> T5Config:
    """`infer_config` of the T5 table, also for already-quantized tensors (packed shapes)."""
    from .weights.tables.t5 import infer_config

    if not _is_prequantized(weights) or "embed.weight" not in weights:
        return infer_config(weights, hf_config)  # (raises, naming what is missing)
    d_model = weights["embed.weight"].shape[1]
    bits = quantize.bits if quantize is not None else _settings_from_shapes(weights, d_model)[0]
    shapes: Dict[str, object] = dict(weights)
    for key in weights:
        if key.endswith(".scales"):
            w = key[: -len("scales")] + "weight"
            out, packed = weights[w].shape
            shapes[w] = _Shape((out, packed * 32 // bits))  # the unquantized (out, in)
    return infer_config(shapes, hf_config)  # type: ignore[arg-type]


# ---- the streamed encoder -----------------------------------------------------------------------
class StreamedT5:
    """T5Encoder's `__call__(input_ids) -> (B, L, d_model)` with one block in memory at a time.

    config: None infers it from the tensors' shapes (and the provider's `hf_config`).
    fresh_weights: see `WeightsProvider`; it must return new lazy arrays on every call.
    quantize: quantize each block's 16-bit tensors on the fly with this spec (keep patterns
        match full paths, `blocks.3.ff.wo`, exactly as `quantize_network` on the whole
        encoder), or, for already-quantized tensors, how they were quantized (None: read
        from their shapes).
    dtype: cast floating tensors to it (None keeps the file's), as `load_t5(dtype=)` does.
    """

    def __init__(
        self,
        config: Optional[T5Config],
        fresh_weights: WeightsProvider,
        quantize: Optional[QuantSpec] = None,
        dtype: Optional[mx.Dtype] = None,
    ):
        self._fresh = fresh_weights
        self.dtype = dtype
        self._layout = getattr(fresh_weights, "description", "streamed T5 weights")
        self._files = [str(f) for f in getattr(fresh_weights, "files", ())]
        weights = fresh_weights()  # lazy: only shapes are looked at here
        hf_config = getattr(fresh_weights, "hf_config", None)
        self.config = config or infer_streamed_config(weights, hf_config, quantize)
        self.prequantized = _is_prequantized(weights)
        if self.prequantized and quantize is None:
            bits, group, mode = _settings_from_shapes(weights, self.config.d_model)
            quantize = QuantSpec(bits, group, mode)
        self.quantize = quantize
        skeleton = T5Encoder(self.config)  # built lazily: allocates nothing
        if self.prequantized:
            self._quantize_structure(skeleton, lambda path: f"{path}.scales" in weights)
        # One check of every name and shape, before any tensor is read.
        check_against_model(skeleton, weights, layout=self._layout, files=self._files)
        # Which layers to quantize on the fly, by full path (as quantize_network decides).
        self._targets: Set[str] = set()
        if quantize is not None and not self.prequantized:
            self._targets = set(quantizable_layers(skeleton, quantize))

    @classmethod
    def from_files(
        cls,
        files: Sequence[str | os.PathLike],
        layout: Optional[NetworkLayout] = None,
        hf_config: Optional[dict] = None,
        quantize: Optional[QuantSpec] = None,
        dtype: Optional[mx.Dtype] = None,
        config: Optional[T5Config] = None,
        prefix: str = "",
    ) -> "StreamedT5":
        return cls(config, t5_weights_provider(files, layout, hf_config, prefix), quantize, dtype)

    @property
    def block_count(self) -> int:
        return self.config.num_layers

    def _quantize_structure(self, module: nn.Module, quantized: Callable[[str], bool]) -> None:
        q = self.quantize
        assert q is not None
        nn.quantize(module, q.group_size, q.bits, mode=q.mode,
                    class_predicate=lambda path, _m: quantized(path))  # fmt: skip

    def _load(self, module: nn.Module, weights: Dict[str, mx.array]) -> None:
        module.load_weights(list(cast_floating(weights, self.dtype).items()), strict=True)

    def _block(self, index: int, weights: Dict[str, mx.array]) -> T5Block:
        """Block `index` holding `weights` (names relative to the block), quantized as asked."""
        block = T5Block(self.config)
        prefix = f"blocks.{index}."
        if self.prequantized:
            self._quantize_structure(block, lambda path: f"{path}.scales" in weights)
            self._load(block, weights)
            return block
        self._load(block, weights)
        targets = {p[len(prefix):] for p in self._targets if p.startswith(prefix)}
        if targets:  # lazy: the 16-bit tensors are read and quantized when the block runs
            self._quantize_structure(block, lambda path: path in targets)
        return block

    def __call__(self, input_ids: mx.array) -> mx.array:
        weights = dict(self._fresh())
        # Embedding, shared position bias and final norm: a T5Encoder without blocks.
        stem = T5Encoder(replace(self.config, num_layers=0))
        self._load(stem, {k: weights.pop(k) for k in STEM_KEYS})
        h = stem.embed_tokens(input_ids)
        bias = stem.position_bias(input_ids.shape[1])
        mx.eval(h, bias)
        final_norm, dtype = stem.final_norm, stem.compute_dtype
        del stem  # frees the embedding table (the largest single tensor)
        for i in range(self.config.num_layers):
            prefix = f"blocks.{i}."
            own = {k[len(prefix):]: weights.pop(k) for k in [k for k in weights if k.startswith(prefix)]}
            block = self._block(i, own)
            del own
            h = block(h, bias)
            mx.eval(h)
            del block  # its tensors had no other reference: their memory is free now
            mx.clear_cache()
        out = final_norm(h, dtype)
        mx.eval(out)
        return out


def streamed_t5(
    path: Union[str, os.PathLike, ModelSources], quantize: Optional[QuantSpec] = None, dtype: Optional[mx.Dtype] = None
) -> StreamedT5:
    """A StreamedT5 for the T5 at `path`: a diffusers folder (text_encoder_3/), Stability
    files (text_encoders/t5xxl_fp16.safetensors, or inside an all-in-one file), one T5 file,
    or a converted sd35_mlx folder (or those, resolved once: a `ModelSources`).

    quantize: for 16-bit sources, quantize each block on the fly. A converted folder's T5 is
    used as stored (its config.json says how it was quantized); `quantize` is then ignored
    when it asks for something else (logged), as re-quantizing quantized weights is not done.
    float16 becomes bfloat16 as in `load_text_encoders` (T5 overflows fp16).
    """
    sources = path if isinstance(path, ModelSources) else resolve_sources(path, ("t5",))
    dtype = component_dtype("t5", dtype)
    if sources.converted is not None:
        return _converted_streamed_t5(sources, quantize, dtype)
    source = sources.source("t5")
    return StreamedT5.from_files(source.files, source.layout, source.hf_config, quantize, dtype)


def _converted_streamed_t5(sources: ModelSources, quantize: Optional[QuantSpec], dtype: Optional[mx.Dtype]) -> StreamedT5:
    folder = sources.path
    entry = sources.converted["components"].get("t5")
    if entry is None:
        raise WeightFileError(f"{folder}: this converted folder has no T5 (converted with --drop-t5?)")
    files = [folder / f for f in entry.get("files", []) if not f.endswith(".json")]
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise WeightFileError(
            f"{folder}: the T5 weight file(s) {', '.join(missing) or '(none listed)'} are missing; "
            "the folder is incomplete. Copy or download it again."
        )
    stored = sources.stored_quantization("t5")
    if stored is None:
        spec = quantize  # 16-bit tensors: quantize on the fly if asked
    else:
        if quantize is not None and (quantize.bits, quantize.group_size, quantize.mode) != (
            stored.bits, stored.group_size, stored.mode
        ):  # fmt: skip
            log.warning("%s: T5 is stored as %s; using it as stored (not %s)", folder, stored.label, quantize.label)
        spec = stored
    return StreamedT5.from_files(files, None, None, spec, dtype, T5Config.from_dict(entry["config"]))


__all__ = [
    "WeightsProvider", "FileWeights", "t5_weights_provider", "infer_streamed_config",
    "StreamedT5", "streamed_t5",
]  # fmt: skip
