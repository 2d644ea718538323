"""What a user asks for: a LoRA source and its weight, from `--lora PATH_OR_REPO[:SCALE]` or from
an image's metadata (`--from-image`), checked before any model loads."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence

from ..errors import InputError
from ..weights.safetensors_file import PICKLE_SUFFIXES


@dataclass(frozen=True)
class LoRASpec:
    source: str  # local path, repo id, or repo:file
    scale: float = 1.0
    name: Optional[str] = None
    text_encoder_scale: Optional[float] = None
    sha256: Optional[str] = None  # as recorded in an image: the file must still be the same

    def __post_init__(self) -> None:
        if not self.source:
            raise InputError("--lora needs a file, folder, repo id or repo:file")
        if self.source.lower().endswith(PICKLE_SUFFIXES):
            raise InputError(f"{self.source}: pickle files are refused (they can run code); use the .safetensors release")
        for what, value in (("scale", self.scale), ("text-encoder scale", self.text_encoder_scale)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise InputError(f"LoRA {self.source}: the {what} must be a finite number (got {value!r})")


def parse_lora_arg(text: str, text_encoder_scale: Optional[float] = None) -> LoRASpec:
    """'style.safetensors', 'style.safetensors:0.8', 'owner/repo', 'owner/repo:file.safetensors:0.8'."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            return LoRASpec(text, text_encoder_scale=text_encoder_scale)
        if not math.isfinite(scale):
            raise InputError(f"--lora {text}: the scale must be a finite number (got {tail})")
        return LoRASpec(head, scale, text_encoder_scale=text_encoder_scale)
    return LoRASpec(text, text_encoder_scale=text_encoder_scale)


def specs_from_metadata(records: Any) -> List[LoRASpec]:
    """The LoRAs an image records (`metadata["loras"]`, written by `LoRA.record`)."""
    if records in (None, []):
        return []
    if not isinstance(records, Sequence) or not all(isinstance(r, Mapping) and r.get("source") for r in records):
        raise InputError(f"the image's 'loras' metadata is not a list of LoRA records: {records!r:.200}")
    return [LoRASpec(str(r["source"]), float(r.get("scale", 1.0)), r.get("name"),
                     None if r.get("text_encoder_scale") is None else float(r["text_encoder_scale"]),
                     r.get("sha256")) for r in records]  # fmt: skip


__all__ = ["LoRASpec", "parse_lora_arg", "specs_from_metadata"]
