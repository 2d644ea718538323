"""Request fields → `GenerationSettings`: one table.

Each field of `/v1/images/generations` and `/v1/images/edits` (OpenAI's and sd35_mlx's own
extras) is a row: its name, the kind of value it carries, and where it goes — a
`GenerationSettings` field, or the request itself (n, size, model, stream …). The kind turns a
JSON value, or the text of a multipart form field, into a typed value; the ranges are
`GenerationSettings.validate`'s (the CLI's rules and messages), checked once the settings are
built. Fields not in the table are refused, so a request cannot reach anything the table
does not name (no paths: `init_image` and `mask` are set by the server from uploaded files only).

To add a field (a LoRA list, a ControlNet …), add a row, and if it is not a settings field,
read it in `ImageRequest`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from ..errors import InputError
from ..settings import GenerationSettings, SkipLayerSettings
from .errors import RequestError

MAX_IMAGES_PER_REQUEST = 10  # OpenAI's bound for n
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound for partial_images
MAX_PROMPT_CHARS = 32_000  # OpenAI's bound for a prompt (the settings' own bound may be lower)
_SIZE = re.compile(r"^([1-9]\d{0,5})x([1-9]\d{0,5})$")


# ---- kinds: a JSON value or a form field's text → a typed value -------------------------------
def _text(value: Any, name: str) -> str:
    if isinstance(value, str):
        return value
    raise RequestError(f"{name} must be a string (got {_show(value)})", param=name, code="invalid_type")


def _prompt(value: Any, name: str) -> str:
    text = _text(value, name)
    if len(text) > MAX_PROMPT_CHARS:
        raise RequestError(f"{name} is {len(text):,} characters long; at most {MAX_PROMPT_CHARS:,} are accepted",
                           param=name, code="string_above_max_length")  # fmt: skip
    return text


def _whole(value: Any, name: str) -> int:
    if isinstance(value, str):  # a multipart form field
        try:
            return int(value.strip())
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    raise RequestError(f"{name} must be a whole number (got {_show(value)})", param=name, code="invalid_type")


def _number(value: Any, name: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise RequestError(f"{name} must be a number (got {_show(value)})", param=name, code="invalid_type") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be a number (got {_show(value)})", param=name, code="invalid_type")
    if not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number (got {value})", param=name, code="invalid_value")
    return float(value)


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RequestError(f"{name} must be true or false (got {_show(value)})", param=name, code="invalid_type")


def _skip_layer_guidance(value: Any, name: str) -> Optional[SkipLayerSettings]:
    """true (the defaults), false, or an object with layers, scale, start, end."""
    if isinstance(value, str):  # a form field holds JSON text
        try:
            value = json.loads(value)
        except ValueError:
            raise RequestError(f"{name} must be true, false or a JSON object", param=name, code="invalid_type") from None
    if isinstance(value, bool):
        return SkipLayerSettings() if value else None
    if not isinstance(value, dict):
        raise RequestError(f"{name} must be true, false or an object with layers, scale, start, end (got {_show(value)})",
                           param=name, code="invalid_type")  # fmt: skip
    unknown = sorted(set(value) - {"layers", "scale", "start", "end"})
    if unknown:
        raise RequestError(f"{name} has unknown fields: {', '.join(map(str, unknown))}", param=name, code="unknown_parameter")
    layers = value.get("layers", list(SkipLayerSettings.layers))
    if not isinstance(layers, list):
        raise RequestError(f"{name}.layers must be a list of layer indices", param=name, code="invalid_type")
    numbers = {k: _number(value[k], f"{name}.{k}") for k in ("scale", "start", "end") if k in value}
    return SkipLayerSettings(layers=tuple(_whole(x, f"{name}.layers") for x in layers), **numbers)


def _lora_weights(value: Any, name: str) -> Dict[str, float]:
    """{LoRA name: weight}; in a form, JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RequestError(f"{name} must be a JSON object of LoRA names and weights", param=name,
                               code="invalid_type") from None  # fmt: skip
    if not isinstance(value, dict):
        raise RequestError(f"{name} must be an object of LoRA names and weights, e.g. {{\"style\": 0.8}} (got {_show(value)})",
                           param=name, code="invalid_type")  # fmt: skip
    return {str(k): _number(v, f"{name}.{k}") for k, v in value.items()}


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else "bytes"
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Field:
    kind: Callable[[Any, str], Any]
    to: Optional[str]  # the GenerationSettings field it sets; None: read by ImageRequest
    doc: str
    endpoints: Tuple[str, ...] = ("generations", "edits")


# The one table. `to=None` rows are request-level (OpenAI's) and read in ImageRequest.
FIELDS: Dict[str, Field] = {
    # OpenAI's fields
    "prompt": Field(_prompt, "prompt", "the prompt (required)"),
    "model": Field(_text, None, "a model id from GET /v1/models (default: the first --model)"),
    "n": Field(_whole, None, f"images to generate, 1–{MAX_IMAGES_PER_REQUEST}; seeds seed, seed+1, …"),
    "size": Field(_text, None, "WIDTHxHEIGHT (multiples of 16) or auto (the model's default size; edits: the image's)"),
    "response_format": Field(_text, None, "b64_json (the only one: the server keeps no files to link to)"),
    "output_format": Field(_text, None, "png (the only one: the metadata lives in PNG text chunks)"),
    "stream": Field(_flag, None, "true: server-sent events (progress, partial images, each image when done)"),
    "partial_images": Field(_whole, None, f"with stream: previews sent while denoising, 0–{MAX_PARTIAL_IMAGES}"),
    "background": Field(_text, None, "auto or opaque (the images have no alpha channel)"),
    "quality": Field(_text, None, "accepted and ignored (steps decide quality here)"),
    "style": Field(_text, None, "accepted and ignored (put the style in the prompt)"),
    "moderation": Field(_text, None, "accepted and ignored (no moderation model runs)"),
    "user": Field(_text, None, "accepted and ignored"),
    "safety_identifier": Field(_text, None, "accepted and ignored"),
    # sd35_mlx's extras
    "negative_prompt": Field(_prompt, "negative_prompt", "negative prompt (used when cfg > 1)"),
    "steps": Field(_whole, "steps", "denoising steps (default: the model variant's)"),
    "cfg": Field(_number, "cfg", "classifier-free guidance scale (≤ 1: one conditional pass)"),
    "seed": Field(_whole, "seed", "seed of the first image (default: random)"),
    "sampler": Field(_text, "sampler", "euler or dpmpp_2m"),
    "shift": Field(_number, "shift", "flow-matching shift"),
    "t5_length": Field(_whole, "t5_length", "T5 tokens, 77–512"),
    "skip_layer_guidance": Field(_skip_layer_guidance, "skip_layer_guidance",
                                 "true, or {layers, scale, start, end}: skip-layer guidance (3.5 Medium)"),  # fmt: skip
    "strength": Field(_number, "strength", "how much to change the image, (0, 1]", ("edits",)),
    "mask_blur": Field(_number, "mask_blur", "with a mask: Gaussian blur radius of its edge, pixels", ("edits",)),
    "mask_crop_padding": Field(_whole, "mask_crop_padding", "with a mask: inpaint a crop this many pixels around it",
                               ("edits",)),  # fmt: skip
    "loras": Field(_lora_weights, None, "{name: weight} for LoRAs the server loaded (--lora); the others keep their weight"),
    "img2img_rule": Field(_text, "img2img_rule", "diffusers (default) or stability: step truncation and SLG window", ("edits",)),
}
# OpenAI fields whose only meaningful value here is the one we produce; other values are refused.
FIXED_VALUES = {"response_format": ("b64_json",), "output_format": ("png",), "background": ("auto", "opaque")}
# Fields read from the multipart body of /v1/images/edits as files, not as values.
FILE_FIELDS = ("image", "image[]", "mask")


@dataclass(frozen=True)
class ImageRequest:
    """A parsed request: which model, how many images, how to answer, and the settings."""

    model: Optional[str]
    n: int
    size: Optional[Tuple[int, int]]  # (width, height), None: auto
    stream: bool
    partial_images: int
    settings: GenerationSettings  # validated, without the model's defaults
    loras: Dict[str, float] = field(default_factory=dict)  # weights for this request, by LoRA name


def parse_request(values: Mapping[str, Any], endpoint: str) -> ImageRequest:
    """Values from a JSON body or a form (texts) → an ImageRequest; RequestError on anything wrong."""
    typed: Dict[str, Any] = {}
    for name, raw in values.items():
        row = FIELDS.get(name)
        if row is None or endpoint not in row.endpoints:
            raise RequestError(f"unknown parameter {name!r}", param=name, code="unknown_parameter")
        if raw is None:  # JSON null: the default, as OpenAI clients send it
            continue
        try:
            typed[name] = row.kind(raw, name)
        except InputError as e:  # a settings type that checks itself when built
            raise RequestError(str(e), param=name, code="invalid_value") from None
    if "prompt" not in typed:
        raise RequestError("prompt is required", param="prompt", code="missing_required_parameter")
    for name, allowed in FIXED_VALUES.items():
        if name in typed and typed[name] not in allowed:
            raise RequestError(f"{name} {typed[name]!r} is not supported; use {' or '.join(allowed)}", param=name,
                               code="invalid_value")  # fmt: skip
    n = typed.get("n", 1)
    if not 1 <= n <= MAX_IMAGES_PER_REQUEST:
        raise RequestError(f"n must be between 1 and {MAX_IMAGES_PER_REQUEST} (got {n})", param="n", code="invalid_value")
    partial = typed.get("partial_images", 0)
    if not 0 <= partial <= MAX_PARTIAL_IMAGES:
        raise RequestError(f"partial_images must be between 0 and {MAX_PARTIAL_IMAGES} (got {partial})",
                           param="partial_images", code="invalid_value")  # fmt: skip
    size = parse_size(typed.get("size", "auto"))
    settings = GenerationSettings(**{FIELDS[k].to: v for k, v in typed.items() if FIELDS[k].to})
    if size is not None:
        settings = replace(settings, width=size[0], height=size[1])
    return ImageRequest(
        model=typed.get("model"), n=n, size=size, stream=typed.get("stream", False), partial_images=partial,
        settings=validated(settings), loras=typed.get("loras", {}),
    )  # fmt: skip


def parse_size(text: str) -> Optional[Tuple[int, int]]:
    if text == "auto":
        return None
    m = _SIZE.match(text)
    if not m:
        raise RequestError(f"size must be WIDTHxHEIGHT, e.g. 1024x1024, or auto (got {_show(text)})",
                           param="size", code="invalid_value")  # fmt: skip
    return int(m.group(1)), int(m.group(2))


def validated(settings: GenerationSettings, check: Optional[Callable[[GenerationSettings], GenerationSettings]] = None):
    """`check(settings)` (default: `settings.validate`) with its InputError as a 400 naming the field."""
    try:
        return (check or GenerationSettings.validate)(settings)
    except InputError as e:
        raise RequestError(str(e), param=_param_of(str(e)), code="invalid_value") from None


_TARGETS = {f.to: name for name, f in FIELDS.items() if f.to}
_TARGETS.update(width="size", height="size", init_image="image", mask="mask")


def _param_of(message: str) -> Optional[str]:
    """The request field a settings message is about: the first field it names (before the value)."""
    if message.lower().startswith("skip-layer guidance"):
        return "skip_layer_guidance"
    words = re.findall(r"[a-z0-9_]+", message.lower().split("(got")[0])
    return next((_TARGETS[w] for w in words if w in _TARGETS), None)


def check_lora_names(weights: Mapping[str, float], pipe) -> None:
    """Every name a request weights must be a LoRA the server loaded onto this model."""
    loaded = [lora.name for lora in pipe.loras]
    unknown = [n for n in weights if n not in loaded]
    if unknown:
        raise RequestError(f"no LoRA named {', '.join(map(repr, unknown))} is loaded on this model; loaded: "
                           f"{', '.join(loaded) or 'none (start the server with --lora)'}", param="loras",
                           code="invalid_value")  # fmt: skip
