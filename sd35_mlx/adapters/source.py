"""Where a LoRA comes from: a local .safetensors (or a folder holding one), a Hugging Face repo id,
or `repo:file` — through the same hub code as models (cached, offline-aware, gated messages).
Pickles are refused; the header is checked (truncation) before any tensor is read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx

from ..errors import InputError, WeightFileError
from ..weights.safetensors_file import load_tensors, read_header, refuse_pickle

# Names trainers give their output, tried when a folder holds several .safetensors files.
DEFAULT_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


@dataclass(frozen=True)
class LoRAFile:
    path: Path
    source: str  # as the user gave it (path, repo id or repo:file)
    sha256: str
    tensors: Dict[str, mx.array] = field(repr=False)
    metadata: Dict[str, str] = field(repr=False)

    @property
    def default_name(self) -> str:
        return self.path.stem


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _in_folder(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    for name in DEFAULT_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise InputError(
        f"{folder}: " + (f"several .safetensors files ({', '.join(f.name for f in files[:8])}); pass the one you mean"
                         if files else "no .safetensors LoRA file in this folder")
    )  # fmt: skip


def split_repo_file(text: str) -> tuple:
    """'owner/name:file.safetensors' -> ('owner/name', 'file.safetensors'); 'owner/name' -> (it, None)."""
    repo, sep, filename = text.partition(":")
    return (repo, filename or None) if sep else (text, None)


def locate(source: str | os.PathLike, revision: Optional[str] = None, token: Optional[str] = None) -> Path:
    """The local file for `source` (downloaded into the Hugging Face cache when it is a repo)."""
    text = os.fspath(source)
    local = Path(text).expanduser()
    if local.is_dir():
        return _in_folder(local)
    if local.exists():
        return local
    refuse_pickle(local)
    if text.startswith(("/", "./", "../", "~")) or text.lower().endswith(".safetensors") and ":" not in text:
        raise InputError(f"{local.absolute()}: no such LoRA file")
    from ..hub import resolve_file

    repo, filename = split_repo_file(text)
    return resolve_file(repo, filename, revision=revision, token=token)


def read_lora(source: str | os.PathLike, revision: Optional[str] = None, token: Optional[str] = None) -> LoRAFile:
    """Check and open a LoRA file (tensors stay lazy: only what is applied is ever read)."""
    path = locate(source, revision, token)
    refuse_pickle(path)
    if path.suffix.lower() != ".safetensors":
        raise WeightFileError(f"{path}: a LoRA must be a .safetensors file (got '{path.suffix or 'no suffix'}')")
    _, metadata = read_header(path)  # raises on truncation or a corrupt header
    return LoRAFile(path, os.fspath(source), sha256_of(path), load_tensors(path), dict(metadata))


__all__ = ["DEFAULT_FILE_NAMES", "LoRAFile", "locate", "read_lora", "sha256_of", "split_repo_file"]
