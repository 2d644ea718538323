"""Images in and out: PNG with embedded generation metadata, and reading it back."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from PIL import Image, PngImagePlugin

from .errors import InputError

METADATA_KEY = "sd35_mlx"
log = logging.getLogger(__name__)


def to_pil(images: mx.array) -> list:
    """(B, H, W, 3) in [-1, 1] -> PIL images (rounded like diffusers, not truncated)."""
    x = mx.clip(images.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)
    arr = np.array(mx.round(x * 255)).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def _open_rgb(path: Path) -> Image.Image:
    if not path.is_file():
        raise InputError(f"init image not found: {path}")
    try:
        return Image.open(path).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read init image {path}: {e}") from None


def init_image_size(path: str | os.PathLike, width: Optional[int], height: Optional[int]) -> Tuple[int, int]:
    """The (width, height) img2img generates at: what was asked; a side not given follows the
    init image (its size rounded to 16 when neither is given, else its aspect ratio)."""
    if width and height:
        return width, height
    path = Path(path)
    try:
        with Image.open(path) as img:  # reads the header only
            w, h = img.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read init image {path}: {e}") from None
    if width:
        height = h * width / w
    elif height:
        width = w * height / h
    else:
        width, height = w, h
    return max(16, int(width / 16 + 0.5) * 16), max(16, int(height / 16 + 0.5) * 16)  # halves up


def load_image(path: str | os.PathLike, width: int, height: int) -> mx.array:
    """An RGB file as (1, H, W, 3) in [-1, 1], resized (LANCZOS) to width x height. An image of
    another aspect ratio is first cropped to it around the centre (never stretched), with a
    warning; a difference of less than one 16-px step is only resized."""
    img = _open_rgb(Path(path))
    w, h = img.size
    if abs(w / h - width / height) * min(height, width) >= 16:
        crop_w, crop_h = (round(h * width / height), h) if w / h > width / height else (w, round(w * height / width))
        left, top = (w - crop_w) // 2, (h - crop_h) // 2
        log.warning("init image %s is %dx%d; cropped to %dx%d around the centre for a %dx%d image "
                    "(pass -W/-H with its aspect ratio, or neither, to keep all of it)",
                    path, w, h, crop_w, crop_h, width, height)  # fmt: skip
        img = img.crop((left, top, left + crop_w, top + crop_h))
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


def _claim(tmp: Path, target: Path) -> bool:
    """Give the finished file `tmp` the name `target` only if no file has it: link(2) fails
    when the name exists, so two writers can never both get it (a check then a rename can)."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: reserve the name exclusively, then fill it
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        os.close(fd)
        os.replace(tmp, target)
        return True


def candidates(path: Path) -> Iterator[Path]:
    """`path`, then `name-1.png`, `name-2.png`, …"""
    yield path
    for i in itertools.count(1):
        yield path.with_name(f"{path.stem}-{i}{path.suffix}")


def check_png_name(path: str | os.PathLike) -> Path:
    """The writer writes PNG only: another extension is refused rather than silently changed."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InputError(f"output {path}: only PNG files are written; use a name ending in .png")
    return path


def unique_path(path: Path, taken: Sequence[Path] = ()) -> Path:
    """`path`, or `name-1.png`, `name-2.png`, … : no existing file (nor one in `taken`). A plan
    only: `save_png` claims the name when it writes."""
    return next(c for c in candidates(path) if not (c.exists() or c in taken))


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


def write_file_exclusively(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through `write(tmp)` into a temp file beside `path`, then give it the first free
    name among `candidates(path)`. Never overwrites; a crash leaves only a dot-named temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        write(tmp)
        for target in candidates(path):
            if _claim(tmp, target):
                return target
    finally:
        if tmp.exists():
            tmp.unlink()
    raise AssertionError("unreachable")  # candidates() is endless


def save_png(image: Image.Image, path: str | os.PathLike, metadata: Dict[str, Any]) -> Path:
    """Write a PNG with the metadata as JSON (and a readable summary). Never overwrites: the
    first free name among path, path-1, … is taken, atomically (safe with parallel writers)."""
    path = check_png_name(path)
    info = png_info(metadata)
    return write_file_exclusively(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_metadata(path: str | os.PathLike) -> Dict[str, Any]:
    """The generation settings stored in a PNG written by sd35_mlx, as a JSON object (its
    fields are not checked here: `GenerationSettings.from_dict` does that)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            text = getattr(img, "text", {}) or {}
            raw = text.get(METADATA_KEY)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{path}: not a readable image ({e})") from None
    if raw is None:
        raise InputError(f"{path} carries no sd35_mlx metadata (was it written by sd35_mlx?)")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path}: the sd35_mlx metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: the sd35_mlx metadata is a JSON {type(meta).__name__}, not an object")
    return meta
