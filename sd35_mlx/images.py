"""Images in and out: PNG with embedded generation metadata, and reading it back."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from PIL import Image, PngImagePlugin

from .errors import InputError

METADATA_KEY = "sd35_mlx"


def to_pil(images: mx.array) -> list:
    """(B, H, W, 3) in [-1, 1] -> PIL images (rounded like diffusers, not truncated)."""
    x = mx.clip(images.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
    arr = np.array(mx.round(x * 255)).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def load_image(path: str | os.PathLike, width: int, height: int) -> mx.array:
    """An RGB file resized (LANCZOS) to width x height, as (1, H, W, 3) in [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"init image not found: {path}")
    try:
        img = Image.open(path).convert("RGB")
    except Exception as e:
        raise InputError(f"cannot read init image {path}: {e}") from e
    if img.size != (width, height):
        img = img.resize((width, height), Image.LANCZOS)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return mx.array(arr)[None]


def describe(meta: Dict[str, Any]) -> str:
    """A one-paragraph, human-readable summary (like other tools' `parameters` text)."""
    lines = [str(meta.get("prompt", ""))]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    keys = ["steps", "sampler", "cfg", "seed", "width", "height", "model", "quantization", "t5"]
    lines.append(", ".join(f"{k}: {meta[k]}" for k in keys if k in meta))
    return "\n".join(lines)


def unique_path(path: Path, taken: Sequence[Path] = ()) -> Path:
    """`path`, or `name-1.png`, `name-2.png`, … : never an existing file (nor one in `taken`)."""
    stem, suffix = path.stem, path.suffix
    candidate, i = path, 0
    while candidate.exists() or candidate in taken:
        i += 1
        candidate = path.with_name(f"{stem}-{i}{suffix}")
    return candidate


def png_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix.lower() == ".png" else path.with_suffix(".png")


def unique_paths(path: str | os.PathLike, count: int) -> List[Path]:
    """The names `count` successive `save_png(…, path, …)` calls would get, planned up front
    (so that several processes can each write some of them)."""
    names: List[Path] = []
    for _ in range(count):
        names.append(unique_path(png_path(path), names))
    return names


def png_info(metadata: Dict[str, Any]) -> PngImagePlugin.PngInfo:
    """The PNG text chunks sd35_mlx writes: the settings as JSON, and a readable summary."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(METADATA_KEY, json.dumps(metadata, sort_keys=True))
    info.add_itxt("parameters", describe(metadata))
    return info


def png_bytes(image: Image.Image, metadata: Optional[Dict[str, Any]] = None) -> bytes:
    """The PNG `save_png` would write, as bytes (for the server); no text chunks without metadata."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(metadata) if metadata is not None else None)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | os.PathLike, metadata: Dict[str, Any]) -> Path:
    """Write a PNG with the metadata as JSON (and a readable summary). Never overwrites."""
    path = png_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = png_info(metadata)
    target = unique_path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        if target.exists():  # someone else took the name meanwhile
            target = unique_path(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def read_metadata(path: str | os.PathLike) -> Dict[str, Any]:
    """The generation settings stored in a PNG written by sd35_mlx."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    with Image.open(path) as img:
        text = getattr(img, "text", {}) or {}
        raw = text.get(METADATA_KEY)
    if raw is None:
        raise InputError(f"{path} carries no sd35_mlx metadata (was it written by sd35_mlx?)")
    return json.loads(raw)
