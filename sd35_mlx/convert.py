"""Convert an SD3 / SD3.5 model to a converted sd35_mlx folder (optionally quantized).

    python -m sd35_mlx.convert --hf-path stabilityai/stable-diffusion-3.5-large
    python -m sd35_mlx.convert --hf-path ./sd3.5_large.safetensors text_encoders/clip_l.safetensors \\
        text_encoders/clip_g.safetensors text_encoders/t5xxl_fp16.safetensors -q --mlx-path sd35l-4bit
    python -m sd35_mlx.convert --hf-path sd35l-mlx --quantize transformer=8 --mlx-path sd35l-8bit

Conventions follow mlx-lm's converter (`--hf-path`, `--mlx-path`, `-q`, `--q-bits`,
`--q-group-size`, `--q-mode`, `--dtype`, `--upload-repo`, `--revision`). Quantization is per
network: the default is T5 at 4-bit and everything else 16-bit; `--quantize
t5=4,clip_g=8,transformer=4` sets it per network, `-q` quantizes the transformer and the
three text encoders with `--q-bits`/`--q-group-size`/`--q-mode`. The VAE is never quantized.

An already converted folder as `--hf-path` is requantized: networks whose quantization
changes are dequantized and quantized again (`--quantize transformer=16` or `-d` undoes it).

Safety: arguments are checked before anything is loaded; the output is written to a temp
folder beside it and renamed into place at the very end (an interrupted or failed conversion
leaves nothing behind); an existing output is never touched without `--force`; free disk
space is checked against the exact output size before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import mlx.core as mx

from ._version import __version__
from .checks import finite_number, whole_number
from .cli import OneLineParser
from .components import COMPONENTS, DTYPES, QUANTIZABLE, REQUIRED, TOKENIZER_FOLDERS, component_dtype, parse_dtype
from .errors import CLIPProjectionWarning, InputError, SD35Error, WeightFileError
from .quantize import (
    MODES, QuantSpec, dequantize_network, make_spec, named_quantization, parse_quantize, quantize_network,
    spec_of, unquantized_share,
)  # fmt: skip
from .variants import detect_variant
from .weights.converted import (
    DEFAULT_MAX_SHARD_BYTES, check_target, is_converted, license_files, load_converted_component,
    logical_parameters, read_converted_config, save_converted, stored_bytes,
)  # fmt: skip
from .weights.safetensors_file import PICKLE_SUFFIXES, refuse_pickle

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+\Z")
DISK_MARGIN_BYTES = 64 * 10**6  # config, tokenizers, model card, filesystem slack
# Shards of 0.1 MB (tests) to 1 TB: smaller would be thousands of files for nothing.
MIN_SHARD_BYTES, MAX_SHARD_BYTES = 10**5, 10**12


@dataclass
class Plan:
    """What will be converted: validated up front, before any tensor is read."""

    inputs: List[str]
    target: Path
    dtype: str
    specs: Dict[str, Optional[QuantSpec]]
    drop_t5: bool
    requantize: bool
    loaders: Dict[str, Callable] = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    source_root: Optional[Path] = None
    license_paths: List[Path] = field(default_factory=list)
    source_card: Optional[str] = None
    variant: Optional[str] = None
    t5_state: str = "present"
    notes: Dict[str, str] = field(default_factory=dict)  # per component, for the summary
    findings: Dict[str, str] = field(default_factory=dict)  # per component, about the weights
    raw_loaders: Dict[str, Callable] = field(default_factory=dict)  # before quantization
    loras: list = field(default_factory=list)  # adapters.apply.LoRA, fused into the 16-bit weights


def _say(quiet: bool, *args) -> None:
    if not quiet:
        print(*args, flush=True)


# ---- arguments ------------------------------------------------------------------------------------
def _as_list(hf_path: Union[str, os.PathLike, Sequence]) -> List[str]:
    items = [os.fspath(hf_path)] if isinstance(hf_path, (str, os.PathLike)) else [os.fspath(p) for p in hf_path]
    if not items or any(not i.strip() for i in items):
        raise InputError("--hf-path is required: a Hugging Face repo id, a diffusers folder, or Stability file(s)")
    return items


def _check_inputs(items: Sequence[str]) -> None:
    for item in items:
        p = Path(item).expanduser()
        if p.suffix.lower() in PICKLE_SUFFIXES:
            refuse_pickle(p)  # refused before anything is read, whether or not it exists
        if not p.exists() and not _REPO_ID.match(item):
            raise InputError(f"{p.absolute()}: no such file or folder (and not a Hugging Face repo id)")
    converted = [i for i in items if is_converted(Path(i).expanduser())]
    if converted and len(items) > 1:
        raise InputError(f"{converted[0]} is a converted folder: requantize it alone (one --hf-path)")
    if len(items) > 1 and any(not Path(i).expanduser().exists() for i in items):
        raise InputError("several --hf-path values must all be local files or folders (one repo id at most, alone)")


def resolve_specs(
    quantize: Union[None, str, Mapping[str, Optional[QuantSpec]]],
    base: Mapping[str, Optional[QuantSpec]],
) -> Dict[str, Optional[QuantSpec]]:
    """Specs for every component: `quantize` text/mapping on top of `base`."""
    if quantize is None:
        return {c: base.get(c) for c in COMPONENTS}
    if isinstance(quantize, str):
        return parse_quantize(quantize, base=base)
    return {c: base.get(c) for c in COMPONENTS} | named_quantization(quantize)


def default_output_name(inputs: Sequence[str], specs: Mapping[str, Optional[QuantSpec]],
                        drop_t5: bool, present: Sequence[str] = QUANTIZABLE) -> str:  # fmt: skip
    """e.g. stable-diffusion-3.5-large-mlx-t5-4bit, sd3.5_medium-mlx-4bit, …-mlx-no-t5."""
    first = inputs[0].rstrip("/\\")
    base = Path(first).stem if Path(first).suffix == ".safetensors" else Path(first).name
    base = re.sub(r"-mlx(-.*)?\Z", "", base) or "model"
    quantized = {c: s for c, s in specs.items() if s is not None and c in present}
    labels = {s.label.replace("-bit", "bit").replace(" ", "-") for s in quantized.values()}
    if not quantized:
        tag = ""
    elif len(labels) == 1 and set(quantized) == set(present):
        tag = "-" + labels.pop()
    else:
        tag = "".join(f"-{c}-{quantized[c].label.replace('-bit', 'bit').replace(' ', '-')}" for c in QUANTIZABLE
                      if c in quantized)  # fmt: skip
    return f"{base}-mlx{tag}" + ("-no-t5" if drop_t5 else "")


# ---- sources ------------------------------------------------------------------------------------
def _component_dtype(component: str, dtype: str) -> mx.Dtype:
    # T5 in bfloat16 when float16 is asked for: said once, in the plan (components.component_dtype)
    return component_dtype(component, parse_dtype(dtype), warn=False)


def _local_inputs(items: Sequence[str], revision: Optional[str], token: Optional[str],
                  wanted: Sequence[str], quiet: bool) -> List[Path]:  # fmt: skip
    out = []
    for item in items:
        p = Path(item).expanduser()
        if p.exists():
            out.append(p)
            continue
        from .hub import resolve_model_path

        _say(quiet, f"Fetching {item}" + (f" @ {revision}" if revision else "") + " from the Hugging Face Hub…")
        out.append(resolve_model_path(item, revision=revision, components=tuple(wanted) + ("tokenizers",), token=token))
        _fetch_card_files(item, revision, token, out[-1])
    return out


def _fetch_card_files(repo_id: str, revision: Optional[str], token: Optional[str], folder: Path) -> None:
    """Best effort: the repo's README.md and license files, for the converted model card."""
    try:
        from huggingface_hub import HfApi, hf_hub_download

        names = [n for n in HfApi(token=token).list_repo_files(repo_id, revision=revision)
                 if "/" not in n and (n == "README.md" or re.match(r"(LICEN[CS]E|NOTICE)", n, re.I))]  # fmt: skip
        for n in names:
            hf_hub_download(repo_id, n, revision=revision, token=token)
    except Exception as e:  # offline, gated: the card then says the source's license applies
        log.info("could not fetch %s's model card / license files: %s", repo_id, e)


def _root_with(paths: Sequence[Path], predicate: Callable[[Path], bool]) -> Optional[Path]:
    for p in paths:
        for candidate in (p, p.parent) if p.is_dir() else (p.parent, p.parent.parent):
            if predicate(candidate):
                return candidate
    return None


def _plan_sources(plan: Plan, paths: Sequence[Path], quiet: bool) -> None:
    """Fill plan.loaders (component -> function building the final network) and provenance."""
    from .loading import _load_source
    from .weights.layouts import resolve_components

    wanted = [c for c in COMPONENTS if not (plan.drop_t5 and c == "t5")]
    sources: Dict[str, object] = {}
    origin: Dict[str, Path] = {}
    for p in paths:
        for component, src in resolve_components(p, wanted).items():
            if component in sources:
                raise InputError(
                    f"the {component} was found in both {origin[component]} and {p}; pass each "
                    "network once"
                )
            sources[component], origin[component] = src, p
    missing = [c for c in REQUIRED if c not in sources]
    if missing:
        raise WeightFileError(
            f"{', '.join(str(p) for p in paths)}: no {', '.join(missing)} found. A Stability single "
            "file holds only the transformer and the VAE: pass the text encoder files too, e.g. "
            "--hf-path sd3.5_large.safetensors text_encoders/clip_l.safetensors "
            "text_encoders/clip_g.safetensors text_encoders/t5xxl_fp16.safetensors"
        )
    if "t5" not in sources:
        plan.t5_state = "dropped" if plan.drop_t5 else "absent"
        if not plan.drop_t5:
            _say(quiet, "No T5-XXL found: the converted model will run in T5-drop mode.")

    def raw_loader(component: str) -> Callable:
        # No tensor cache across networks: a cached source tensor would stay in memory once
        # written; opening a file again costs only its header (mx.load is lazy).
        def load():
            with warnings.catch_warnings():  # reported once in the summary instead (loads run twice)
                warnings.simplefilter("ignore", CLIPProjectionWarning)
                model = _load_source(component, sources[component], _component_dtype(component, plan.dtype))
            _check_projection(plan, component, model, ", ".join(str(f) for f in sources[component].files))
            return model

        return load

    def loader(component: str) -> Callable:
        def load():  # LoRAs are fused into the 16-bit weights, then the result is quantized
            model = _with_loras_fused(plan, component, raw_loaders[component]())
            return quantize_network(model, plan.specs.get(component), component)

        return load

    raw_loaders = {c: raw_loader(c) for c in COMPONENTS if c in sources}
    plan.loaders = {c: loader(c) for c in COMPONENTS if c in sources}
    plan.raw_loaders = raw_loaders
    plan.source.update(
        layouts={c: s.layout.name for c, s in sources.items()},
        files={c: [str(f) for f in s.files] for c, s in sources.items()},
    )
    plan.source_root = _root_with(paths, lambda d: (d / TOKENIZER_FOLDERS["clip_l"]).is_dir())
    license_root = _root_with(paths, lambda d: bool(license_files(d)))
    plan.license_paths = license_files(license_root)
    card_root = _root_with(paths, lambda d: (d / "README.md").is_file())
    if card_root is not None:
        plan.source_card = (card_root / "README.md").read_text(errors="replace")
    if plan.source_root is None:
        _say(quiet, "Note: no tokenizer/ folders next to the weights: copy tokenizer/, tokenizer_2/ "
                    "(and tokenizer_3/) from the diffusers repo into the converted folder.")  # fmt: skip


def _with_loras_fused(plan: Plan, component: str, model):
    """`model` with `plan.loras` baked into its 16-bit weights (--lora ... --fuse-lora)."""
    from .adapters.apply import attach_lora
    from .adapters.lora import bake

    for lora in plan.loras:
        attach_lora(model, component, lora)
    bake(model)
    return model


def _plan_loras(plan: Plan, loras: Sequence, strict: bool) -> None:
    """Read and check every LoRA against the (lazily built, unquantized) networks up front."""
    from .adapters.apply import prepare
    from .adapters.source import read_lora
    from .adapters.spec import LoRASpec, parse_lora_arg

    if plan.requantize:
        raise InputError(
            "--fuse-lora needs the 16-bit source model, not a converted folder: fusing into already "
            "quantized weights and quantizing again would round the LoRA away"
        )
    networks = {c: load() for c, load in plan.raw_loaders.items() if c != "vae"}
    for item in loras:
        spec = item if isinstance(item, LoRASpec) else parse_lora_arg(str(item))
        lora = prepare(read_lora(spec.source), networks, name=spec.name, scale=spec.scale,
                       text_encoder_scale=spec.text_encoder_scale, strict=strict)  # fmt: skip
        plan.loras.append(lora)
    plan.source["fused_loras"] = [lora.record() for lora in plan.loras]


def _check_projection(plan: Plan, component: str, model, source: str) -> None:
    """A CLIP-L text_projection that is not the identity is reported, not refused
    (it is converted as stored; see sd35_mlx.weights.tables.clip)."""
    if component == "clip_l":
        from .weights.tables.clip import clip_l_projection_note

        note = clip_l_projection_note(model, source)
        if note is not None:
            plan.findings[component] = note


def entry_dtype(entry: dict) -> str:
    return entry.get("dtype") or "16-bit"


def _plan_requantize(plan: Plan, folder: Path, quiet: bool) -> None:
    config = read_converted_config(folder)
    entries = config["components"]
    old = {c: (QuantSpec.from_dict(e["quantization"]) if e.get("quantization") else None) for c, e in entries.items()}
    if plan.drop_t5 and "t5" in entries:
        plan.t5_state = "dropped"
    else:
        plan.t5_state = config.get("t5", "present")

    def loader(component: str) -> Callable:
        def load():
            model = load_converted_component(folder, component, _component_dtype(component, plan.dtype))
            _check_projection(plan, component, model, f"converted folder {folder}")
            new = plan.specs.get(component)
            if new != old.get(component):
                if spec_of(model) is not None:
                    dequantize_network(model)
                quantize_network(model, new, component)
            return model

        return load

    plan.loaders = {c: loader(c) for c in COMPONENTS if c in entries and not (plan.drop_t5 and c == "t5")}
    for c in plan.loaders:
        if plan.specs.get(c) != old.get(c):
            plan.notes[c] = f"  (was {old[c].label if old.get(c) else entry_dtype(entries[c])})"
    plan.source = dict(config.get("source") or {})
    plan.source["requantized_from"] = str(folder)
    plan.variant = config.get("variant")
    plan.source_root = folder
    plan.license_paths = license_files(folder)
    card = folder / "README.md"
    plan.source_card = card.read_text(errors="replace") if card.is_file() else None


# ---- planning -------------------------------------------------------------------------------------
def plan_conversion(
    hf_path, mlx_path=None, *, revision=None, dtype="bfloat16", quantize=None, drop_t5=False,
    force=False, token=None, quiet=False, loras=(), lora_strict=True,
) -> Plan:  # fmt: skip
    """Check every argument (nothing is loaded), then locate the sources (headers only)."""
    items = _as_list(hf_path)
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    _check_inputs(items)
    resolve_specs(quantize, parse_quantize("", defaults=True))  # syntax errors before any download
    if mlx_path is not None:
        check_target(mlx_path, force)
    wanted = [c for c in COMPONENTS if not (drop_t5 and c == "t5")]
    paths = _local_inputs(items, revision, token, wanted, quiet)  # downloads repo ids (no loading)
    requantize = is_converted(paths[0])
    if requantize and len(paths) > 1:
        raise InputError(f"{items[0]} is a converted folder: requantize it alone (one --hf-path)")
    if requantize:
        cfg = read_converted_config(paths[0])  # refuses newer format versions
        base = {c: (QuantSpec.from_dict(e["quantization"]) if e.get("quantization") else None)
                for c, e in cfg["components"].items()}  # fmt: skip
    else:
        base = parse_quantize("", defaults=True)
    specs = resolve_specs(quantize, base)
    present = [c for c in QUANTIZABLE if not (drop_t5 and c == "t5")]
    target = check_target(mlx_path or default_output_name(items, specs, drop_t5, present), force)
    if not requantize and any(p.resolve() == target.resolve() for p in paths):
        raise InputError(f"--mlx-path {target} is the input itself; choose another output folder")
    if dtype == "float16" and "t5" in present:
        _say(quiet, "Note: T5-XXL overflows in float16; it is stored in bfloat16 (the other networks in float16).")
    plan = Plan(items, target, dtype, specs, drop_t5, requantize)
    local = [Path(i).expanduser().exists() for i in items]
    plan.source = (
        {"repo_id": items[0], "revision": revision} if not local[0]
        else {"path": str(Path(items[0]).expanduser().absolute())}
    )  # fmt: skip
    if len(items) > 1:
        plan.source["inputs"] = [str(Path(i).expanduser().absolute()) if l else i for i, l in zip(items, local)]
    if requantize:
        _plan_requantize(plan, paths[0], quiet)
    else:
        _plan_sources(plan, paths, quiet)
    if loras:
        _plan_loras(plan, loras, lora_strict)
    if plan.variant is None and "transformer" in plan.loaders:
        plan.variant = _variant(plan)
    return plan


def _variant(plan: Plan) -> str:
    model = plan.loaders["transformer"]()  # lazy: builds the graph, reads no tensor data
    hint = " ".join(plan.inputs)
    return detect_variant(model.config, hint=hint).name


def estimate(plan: Plan, quiet: bool = True) -> Dict[str, Dict[str, int]]:
    """{component: {"parameters", "bytes"}} of the output, from shapes only (nothing is read).

    Also says when a group size leaves much of a network unquantized (widths that are not
    multiples of it, e.g. SD3.5 Large's 2432 with group 128)."""
    out = {}
    for component, load in plan.loaders.items():
        model = load()
        out[component] = {"parameters": logical_parameters(model), "bytes": stored_bytes(model)}
        spec = plan.specs.get(component)
        share = unquantized_share(model, spec) if spec is not None else 0.0
        if share > 0.05:
            hint = (f"; a smaller group size (--q-group-size {spec.group_size // 2}) quantizes more of them"
                    if spec.group_size > 32 else "")  # fmt: skip
            _say(quiet, f"Note: {share:.0%} of the {component}'s weights stay 16-bit: their input widths are "
                        f"not multiples of group size {spec.group_size}{hint}.")  # fmt: skip
        del model
    return out


def check_disk_space(target: Path, needed: int) -> None:
    """Raise before writing when the output cannot fit (the temp folder sits beside it)."""
    probe = target.absolute().parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise SD35Error(
            f"not enough free disk space for {target}: the converted model needs about "
            f"{needed / 1e9:.2f} GB, and {probe} has {free / 1e9:.2f} GB free. Free some space, "
            "choose --mlx-path on another disk, or quantize more (e.g. -q)."
        )


# ---- converting -----------------------------------------------------------------------------------
def convert(
    hf_path: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    mlx_path: Optional[Union[str, os.PathLike]] = None,
    revision: Optional[str] = None,
    dtype: str = "bfloat16",
    quantize: Union[None, str, Mapping[str, Optional[QuantSpec]]] = None,
    drop_t5: bool = False,
    force: bool = False,
    upload_repo: Optional[str] = None,
    token: Optional[str] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    quiet: bool = False,
    loras: Sequence = (),
    lora_strict: bool = True,
) -> Path:
    """Convert (or requantize) a model into a converted sd35_mlx folder; returns its path.

    hf_path: a repo id, a diffusers folder, a Stability single file plus its separate text
      encoder files (a list), or a converted folder (requantize).
    quantize: None (defaults: T5 4-bit; requantize: unchanged), text such as
      "t5=4,clip_g=8,transformer=mxfp4" or "none", or {component: QuantSpec or None}.
    loras: LoRAs ("path[:scale]" or adapters.spec.LoRASpec) fused into the 16-bit weights before
      quantizing (the one place a LoRA may end up inside quantized weights); recorded in config.json.
    """
    t0 = time.perf_counter()
    if upload_repo is not None and not _REPO_ID.match(upload_repo):
        raise InputError(f"--upload-repo must look like 'user/name'; got {upload_repo!r}")
    whole_number("max_shard_bytes", max_shard_bytes, MIN_SHARD_BYTES, MAX_SHARD_BYTES)
    plan = plan_conversion(hf_path, mlx_path, revision=revision, dtype=dtype, quantize=quantize,
                           drop_t5=drop_t5, force=force, token=token, quiet=quiet, loras=loras,
                           lora_strict=lora_strict)  # fmt: skip
    for lora in plan.loras:
        _say(quiet, f"Fusing LoRA {lora.name} ({lora.parsed.format}, scale {lora.scale:g}) into the 16-bit "
                    f"{', '.join(lora.components)} before quantizing")  # fmt: skip
    sizes = estimate(plan, quiet)
    total = sum(s["bytes"] for s in sizes.values())
    check_disk_space(plan.target, total + DISK_MARGIN_BYTES)
    _say(quiet, f"Converting {' + '.join(plan.inputs)} -> {plan.target} ({_human(total)}, {plan.dtype})")
    rows: List[tuple] = []
    last = [time.perf_counter()]

    def written(component: str, entry: dict) -> None:
        now = time.perf_counter()
        rows.append((component, entry, now - last[0]))
        note = plan.notes.get(component, "")
        _say(quiet, "  " + _row(component, entry, plan.specs.get(component), now - last[0]) + note)
        last[0] = now
        mx.clear_cache()

    save_converted(
        plan.target, plan.loaders, quantization=plan.specs, dtype=plan.dtype, variant=plan.variant,
        source=plan.source, source_root=plan.source_root, license_paths=plan.license_paths,
        source_card=plan.source_card, t5=plan.t5_state, max_shard_bytes=max_shard_bytes, force=force,
        on_written=written, upload_repo=upload_repo,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    folder_bytes = sum(f.stat().st_size for f in plan.target.rglob("*") if f.is_file())
    params = sum(e["parameters"] for _, e, _ in rows)
    weights = sum(e["bytes"] for _, e, _ in rows)
    _say(quiet, f"  {'total':<12}{params / 1e6:>10,.1f} M params  {'':<22}{_human(weights):>10}   {elapsed:.1f} s"
                f"   (folder with tokenizers: {_human(folder_bytes)})")  # fmt: skip
    if plan.t5_state != "present":
        _say(quiet, f"  T5: {plan.t5_state} (the model runs in T5-drop mode)")
    for note in plan.findings.values():
        if quiet:
            log.warning("%s", note)
        else:
            _say(quiet, f"  Note: {note}")
    _say(quiet, f"Done: {plan.target}")
    if upload_repo:
        upload(plan.target, upload_repo, token=token, quiet=quiet)
    return plan.target


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _row(component: str, entry: dict, spec: Optional[QuantSpec], seconds: float) -> str:
    how = spec.label if spec else (entry.get("dtype") or "")
    return f"{component:<12}{entry['parameters'] / 1e6:>10,.1f} M params  {how:<22}{_human(entry['bytes']):>10}   {seconds:.1f} s"


def upload(folder: Path, repo_id: str, token: Optional[str] = None, quiet: bool = False) -> None:
    """Create `repo_id` (if needed) and upload the converted folder, like mlx-lm does."""
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message="Upload sd35_mlx converted model")  # fmt: skip
    except Exception as e:
        raise SD35Error(
            f"the conversion is complete ({folder}) but uploading it to {repo_id} failed: {e}. "
            "Log in with `hf auth login` (a token with write access), then upload the folder, e.g. "
            f"`hf upload {repo_id} {folder}`."
        ) from e
    _say(quiet, f"Uploaded to https://huggingface.co/{repo_id}")


# ---- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m sd35_mlx.convert",
        description="Convert an SD3 / SD3.5 model to the sd35_mlx format, optionally quantized.",
        epilog="Installed as the console script sd35-convert; `python convert.py` in a clone does the same.",
    )
    p.add_argument("--version", action="version", version=f"sd35_mlx {__version__}")
    p.add_argument("--hf-path", nargs="+", metavar="PATH",
                   help="Hugging Face repo id, diffusers folder, Stability single file (+ its text "
                        "encoder files), or a converted folder to requantize")  # fmt: skip
    p.add_argument("--mlx-path", help="output folder (default: <source>-mlx[-<quantization>] in the current folder)")
    p.add_argument("--revision", help="Hub branch, tag or commit")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="precision of the unquantized weights and of the scales (T5 is never float16)")  # fmt: skip
    p.add_argument("--quantize", metavar="SPEC",
                   help="per network, e.g. 't5=4,clip_g=8,transformer=4', 'transformer=4:32', "
                        "'t5=mxfp4', 'none'. Default: t5=4 (requantize: unchanged)")  # fmt: skip
    p.add_argument("-q", "--quantize-all", action="store_true",
                   help="quantize the transformer and all text encoders with --q-bits/--q-group-size/--q-mode")
    p.add_argument("--q-bits", type=int, help="bits for -q (default 4; mxfp8: 8)")
    p.add_argument("--q-group-size", type=int, help="group size for -q (default 64; mx modes 32, nvfp4 16)")
    p.add_argument("--q-mode", choices=tuple(MODES), help="quantization mode for -q (default affine)")
    p.add_argument("-d", "--dequantize", action="store_true", help="store every network unquantized (same as --quantize none)")
    p.add_argument("--drop-t5", action="store_true", help="leave T5-XXL out (the model then runs in T5-drop mode)")
    p.add_argument("--force", action="store_true", help="replace an existing --mlx-path (only once the new one is complete)")
    p.add_argument("--upload-repo", help="upload the result to this Hugging Face repo (user/name)")
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or `hf auth login`)")
    p.add_argument("--max-shard-size", type=_shard_gb, default=DEFAULT_MAX_SHARD_BYTES / 1e9, metavar="GB",
                   help="split a network's weights into files of at most this size (default 5)")  # fmt: skip
    p.add_argument("--lora", action="append", default=[], metavar="PATH_OR_REPO[:SCALE]",
                   help="a LoRA to fuse into the 16-bit weights before quantizing (needs --fuse-lora); repeatable")
    p.add_argument("--fuse-lora", action="store_true", help="fuse the --lora files into the converted model")
    p.add_argument("--lora-strict", choices=("on", "off"), default="on",
                   help="off: fuse a LoRA even when some of its keys match nothing (and say how many)")
    p.add_argument("--controlnet", metavar="PATH_OR_REPO",
                   help="convert a ControlNet instead (its own folder; --quantize controlnet=4; docs/control.md)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors and warnings")
    return p


def _shard_gb(value: str) -> float:
    try:
        return finite_number("--max-shard-size", float(value), MIN_SHARD_BYTES / 1e9, MAX_SHARD_BYTES / 1e9)
    except (ValueError, InputError) as e:
        raise argparse.ArgumentTypeError(f"expected GB between {MIN_SHARD_BYTES / 1e9:g} and {MAX_SHARD_BYTES / 1e9:g}, got {value!r}") from e


def quantization_from_args(args: argparse.Namespace) -> Union[None, str, Dict[str, Optional[QuantSpec]]]:
    q_options = [n for n in ("q_bits", "q_group_size", "q_mode") if getattr(args, n) is not None]
    if q_options and not args.quantize_all:
        names = ", ".join("--" + n.replace("_", "-") for n in q_options)
        raise InputError(f"{names} only apply with -q/--quantize-all (per network: --quantize t5=4:32,...)")
    if args.dequantize and (args.quantize_all or args.quantize):
        raise InputError("-d/--dequantize cannot be combined with -q or --quantize")
    if args.dequantize:
        return "none"
    if not args.quantize_all:
        return args.quantize
    base = {c: make_spec(c, args.q_bits, args.q_group_size, args.q_mode or "affine") for c in QUANTIZABLE}
    base["vae"] = None
    return parse_quantize(args.quantize, base=base) if args.quantize else base


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if bool(args.hf_path) == bool(args.controlnet):
        parser.error("give --hf-path (a model) or --controlnet (a ControlNet)")
    try:
        if args.controlnet:
            from .control.convert import convert_controlnet

            out = convert_controlnet(args.controlnet, args.mlx_path or Path(args.controlnet).name.split(".")[0] + "-mlx",
                                     dtype=args.dtype, quantize=args.quantize, force=args.force)  # fmt: skip
            _say(args.quiet, f"wrote {out}")
            return 0
        quantize = quantization_from_args(args)
        if bool(args.lora) != args.fuse_lora:
            raise InputError("--lora and --fuse-lora go together: a converted model holds LoRAs only fused "
                             "into it (to apply a LoRA at runtime, pass --lora to sd35_mlx.generate instead)")
        convert(
            args.hf_path, args.mlx_path, revision=args.revision, dtype=args.dtype, quantize=quantize,
            drop_t5=args.drop_t5, force=args.force, upload_repo=args.upload_repo, token=args.token,
            max_shard_bytes=round(args.max_shard_size * 1e9), quiet=args.quiet, loras=args.lora,
            lora_strict=args.lora_strict == "on",
        )  # fmt: skip
    except SD35Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
