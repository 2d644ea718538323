"""Which files hold which network, in which layout — decided from safetensors headers only.

`resolve_components(path)` accepts (docs/loading.md, "What `path` can be"):
- a diffusers model folder (`model_index.json`, `transformer/`, `vae/`, `text_encoder*/`):
  a sharded component loads exactly the shards its `*.safetensors.index.json` names,
  otherwise `diffusion_pytorch_model.safetensors` / `model.safetensors`; the `*.fp16*`
  duplicates are used only when nothing else is there; sibling folders such as `vae copy/`
  or `text_encoders/` are never looked at while the diffusers folder has the component;
- one component's folder (e.g. `…/transformer`, `…/text_encoder_3`);
- a Stability single file (`model.diffusion_model.*` + `first_stage_model.*`, perhaps
  `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`), or a folder holding one, with the
  separate encoders in `text_encoders/` (`clip_l`, `clip_g`, `t5xxl_fp16.safetensors`);
- a separate text encoder, VAE or transformer file;
- a repo snapshot with both the diffusers folders and the Stability file: the diffusers
  folders win, component by component, and the two are never mixed within one network.

Nothing here reads tensor data. Pickle checkpoints are refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..components import COMPONENTS, DESCRIPTIONS as _DESCRIPTION, DIFFUSERS_FOLDERS, check_component
from ..errors import SD35Error, WeightFileError
from . import converted
from .mapping import NetworkLayout
from .safetensors_file import PICKLE_SUFFIXES, TensorInfo, read_header

log = logging.getLogger(__name__)

SAI_TEXT_ENCODERS_FOLDER = "text_encoders"
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers / transformers file names

EXPECTED = (
    "Expected one of: a diffusers SD3/SD3.5 folder (model_index.json, transformer/, vae/, "
    "text_encoder/, text_encoder_2/, text_encoder_3/); one of its component folders; a "
    "Stability single file such as sd3.5_medium.safetensors (model.diffusion_model.* and "
    "first_stage_model.* tensors), alone or in a folder with text_encoders/clip_l.safetensors, "
    "clip_g.safetensors and t5xxl_fp16.safetensors; or one of those text encoder files."
)


@dataclass(frozen=True)
class ComponentSource:
    """Where one network's tensors are: the files to merge, their layout, its config.json."""

    files: List[Path]
    layout: NetworkLayout
    hf_config: Optional[dict] = None


# ---- the layouts, imported late: the tables import the networks --------------------------
def _tables():
    from .tables import clip, mmdit, t5, vae

    return clip, mmdit, t5, vae


# ---- what one safetensors header holds -----------------------------------------------------
@dataclass(frozen=True)
class _Header:
    path: Path
    infos: Dict[str, TensorInfo]

    def has(self, key: str) -> bool:
        return key in self.infos

    def any_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.infos)

    def fp8_under(self, prefix: str) -> bool:
        return any(k.startswith(prefix) and i.dtype.startswith("F8") for k, i in self.infos.items())

    def width(self, key: str) -> Optional[int]:
        info = self.infos.get(key)
        return info.shape[-1] if info is not None and info.shape else None


def _header(path: Path) -> _Header:
    return _Header(path, read_header(path)[0])


def _headers(files: Sequence[Path]) -> _Header:
    """The headers of a component's shards as one."""
    infos: Dict[str, TensorInfo] = {}
    for f in files:
        infos.update(read_header(f)[0])
    return _Header(files[0], infos)


_CLIP_TOKEN = "text_model.embeddings.token_embedding.weight"
_T5_MARKERS = ("encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight",
               "encoder.embed_tokens.weight")  # fmt: skip
_SAI_TE = "text_encoders.{}.transformer."


@dataclass(frozen=True)
class _Found:
    """One network found in one file. `which` is set for a bare CLIP (L or G unknown yet)."""

    component: str  # "clip" while L/G is undecided
    layout: NetworkLayout
    fp8: bool = False
    width: Optional[int] = None


def _classify(h: _Header, *, diffusers_context: bool) -> List[_Found]:
    """Every network whose tensors `h` holds. `diffusers_context`: a diffusers component folder."""
    clip, mmdit, t5, vae = _tables()
    found: List[_Found] = []
    # Stability all-in-one: prefixes name the networks.
    if h.any_prefix("model.diffusion_model."):
        found.append(_Found("transformer", mmdit.STABILITY, h.fp8_under("model.diffusion_model.")))
    if h.any_prefix("first_stage_model.decoder."):
        found.append(_Found("vae", vae.STABILITY, h.fp8_under("first_stage_model.")))
    for which in ("clip_l", "clip_g"):
        prefix = _SAI_TE.format(which)
        if h.has(prefix + _CLIP_TOKEN):
            found.append(_Found(which, clip.single_file(which), h.fp8_under(prefix)))
    t5_prefix = _SAI_TE.format("t5xxl")
    if any(h.has(t5_prefix + m) for m in _T5_MARKERS):
        found.append(_Found("t5", t5.SINGLE_FILE, h.fp8_under(t5_prefix)))
    if found:
        return found
    # Bare networks (one per file).
    if h.has("pos_embed.proj.weight") and h.any_prefix("transformer_blocks."):
        return [_Found("transformer", mmdit.DIFFUSERS, h.fp8_under(""))]
    if h.has("x_embedder.proj.weight") and h.any_prefix("joint_blocks."):
        bare = mmdit.STABILITY.with_prefix("", "Stability MMDiT file (joint_blocks.*, no prefix)")
        return [_Found("transformer", bare, h.fp8_under(""))]
    if h.has("decoder.conv_in.weight") and h.any_prefix("decoder.up_blocks."):
        return [_Found("vae", vae.DIFFUSERS, h.fp8_under(""))]
    if h.has("decoder.conv_in.weight") and h.any_prefix("decoder.up."):
        return [_Found("vae", vae.STABILITY_STANDALONE, h.fp8_under(""))]
    if h.has(_CLIP_TOKEN):
        layout = clip.DIFFUSERS if diffusers_context else clip.STABILITY
        return [_Found("clip", layout, h.fp8_under(""), h.width(_CLIP_TOKEN))]
    if any(h.has(m) for m in _T5_MARKERS):
        layout = t5.DIFFUSERS if diffusers_context else t5.STABILITY
        return [_Found("t5", layout, h.fp8_under(""))]
    return []


def _key_sample(h: _Header, n: int = 6) -> str:
    keys = sorted(h.infos)
    return ", ".join(keys[:n]) + (f" … ({len(keys)} tensors)" if len(keys) > n else "")


# ---- which CLIP a bare CLIP file is ---------------------------------------------------------
_CLIP_WIDTHS = {768: "clip_l", 1280: "clip_g"}
_ACTIVATIONS = {"quick_gelu": "clip_l", "gelu": "clip_g"}


def _known_clip_config(component: str, hf_config: Optional[dict]) -> Optional[dict]:
    """Stability files carry no config.json; which CLIP it is fixes its activation (so
    fine-tunes of any width load)."""
    if hf_config is not None or component not in ("clip_l", "clip_g"):
        return hf_config
    return {"hidden_act": "quick_gelu" if component == "clip_l" else "gelu"}


def _name_hint(name: str) -> Optional[str]:
    low = name.lower().replace("-", "_")
    for folder_name, component in (("text_encoder_2", "clip_g"), ("text_encoder", "clip_l")):
        if low == folder_name:
            return component
    if "clip_l" in low or "clipl" in low:
        return "clip_l"
    if "clip_g" in low or "clipg" in low or "bigg" in low:
        return "clip_g"
    return None


def _which_clip(found: _Found, path: Path, hf_config: Optional[dict], folder_hint: Optional[str]) -> str:
    hint = folder_hint or _name_hint(path.stem) or _name_hint(path.parent.name)
    if hint in ("clip_l", "clip_g"):
        return hint
    act = (hf_config or {}).get("hidden_act")
    if act in _ACTIVATIONS:
        return _ACTIVATIONS[act]
    if found.width in _CLIP_WIDTHS:
        return _CLIP_WIDTHS[found.width]
    raise WeightFileError(
        f"{path}: a CLIP text encoder of width {found.width}, but neither its name nor a "
        "config.json says whether it is CLIP-L or CLIP-G. Name the file clip_l.safetensors or "
        "clip_g.safetensors (or put it in text_encoder/ or text_encoder_2/ with its config.json)."
    )


# ---- diffusers component folders ------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightFileError(f"{path}: cannot be read as JSON ({e}); download it again.") from None
    if not isinstance(data, dict):
        raise WeightFileError(f"{path}: expected a JSON object")
    return data


def shards_from_index(index: Path) -> List[Path]:
    """The shard files an index names, each checked to exist and to hold its tensors."""
    data = _read_json(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightFileError(f"{index}: no 'weight_map' in this shard index; download it again.")
    by_shard: Dict[str, List[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    shards = []
    for name in sorted(by_shard):
        shard = index.parent / name
        if not shard.is_file():
            raise WeightFileError(
                f"{index} names the shard {name}, which is missing in {index.parent}: the download "
                "is incomplete. Download the folder again (e.g. the same snapshot_download call)."
            )
        keys = read_header(shard)[0]
        absent = [k for k in by_shard[name] if k not in keys]
        if absent:
            raise WeightFileError(
                f"{shard}: {len(absent)} tensors listed for it in {index.name} are not in it "
                f"(e.g. {absent[0]}); the shard and its index do not belong together."
            )
        shards.append(shard)
    return shards


def component_weight_files(folder: Path) -> List[Path]:
    """The weight files of one diffusers/transformers component folder (never both variants)."""
    folder = Path(folder)
    for variant in ("", ".fp16"):
        for stem in WEIGHT_STEMS:
            index = folder / f"{stem}.safetensors.index{variant}.json"
            if index.is_file():
                files = shards_from_index(index)
            elif (folder / f"{stem}{variant}.safetensors").is_file():
                files = [folder / f"{stem}{variant}.safetensors"]
            else:
                continue
            if variant:
                log.info("%s: only the fp16 variant of the weights is present; using it", folder)
            return files
    others = sorted(p.name for p in folder.iterdir() if p.is_file())
    pickles = [n for n in others if Path(n).suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise WeightFileError(
            f"{folder}: holds only pickle weights ({', '.join(pickles)}), which sd35_mlx refuses to "
            "read (they can run arbitrary code). Download the .safetensors files of the model."
        )
    raise WeightFileError(
        f"{folder}: no weights found (looked for diffusion_pytorch_model.safetensors, "
        "model.safetensors or a *.safetensors.index.json); the folder has: "
        f"{', '.join(others) or 'nothing'}. The download may be incomplete."
    )


def _component_folder(folder: Path, folder_hint: Optional[str] = None) -> Tuple[str, ComponentSource]:
    """The one network a diffusers component folder holds (e.g. `…/text_encoder_2`)."""
    config_path = folder / "config.json"
    hf_config = _read_json(config_path) if config_path.is_file() else None
    files = component_weight_files(folder)
    h = _headers(files)
    found = _classify(h, diffusers_context=True)
    if len(found) != 1:
        raise WeightFileError(
            f"{folder}: the weights ({files[0].name}) are not one SD3 network: "
            + (f"found {', '.join(f.component for f in found)}" if found else f"tensors {_key_sample(h)}")
            + f". {EXPECTED}"
        )
    component = found[0].component
    if component == "clip":
        component = _which_clip(found[0], files[0], hf_config, folder_hint or _name_hint(folder.name))
    _refuse_fp8(found[0], files)
    return component, ComponentSource(files, found[0].layout, hf_config)


def _refuse_fp8(found: _Found, files: Sequence[Path]) -> None:
    if found.fp8:
        raise WeightFileError(
            f"{', '.join(map(str, files))}: the {_DESCRIPTION.get(found.component, found.component)} "
            "is stored in fp8, which sd35_mlx does not read. Use the 16-bit release (e.g. "
            "t5xxl_fp16.safetensors, or the diffusers folders)."
        )


def is_diffusers_root(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or any(
        (folder / sub / "config.json").is_file() for sub in DIFFUSERS_FOLDERS.values()
    )


def _model_index_absent(folder: Path) -> set:
    """Components model_index.json declares as absent (`[null, null]`, e.g. T5 dropped)."""
    path = folder / "model_index.json"
    if not path.is_file():
        return set()
    index = _read_json(path)
    return {c for c, sub in DIFFUSERS_FOLDERS.items() if sub in index and index[sub] in (None, [None, None])}


def _from_diffusers(folder: Path, wanted: Sequence[str]) -> Dict[str, ComponentSource]:
    out: Dict[str, ComponentSource] = {}
    absent = _model_index_absent(folder)
    for component in wanted:
        sub = folder / DIFFUSERS_FOLDERS[component]
        if component in absent or not sub.is_dir():
            continue
        has_weights = any(p.suffix in (".safetensors", ".json") and p.name != "config.json"
                          for p in sub.iterdir())  # fmt: skip
        if not has_weights and not any(p.suffix.lower() in PICKLE_SUFFIXES for p in sub.iterdir()):
            continue  # a config-only folder: this component was not downloaded
        found_component, source = _component_folder(sub, component if component.startswith("clip") else None)
        if found_component != component:
            raise WeightFileError(
                f"{sub}: expected the {_DESCRIPTION[component]} there, but its weights are the "
                f"{_DESCRIPTION.get(found_component, found_component)}."
            )
        out[component] = source
    return out


# ---- Stability files --------------------------------------------------------------------------
def _safetensors_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors")


def _from_files(files: Iterable[Path], wanted: Sequence[str], *, where: str) -> Dict[str, ComponentSource]:
    """Pick, per wanted network, the one file that holds it (dedicated files before all-in-one)."""
    candidates: Dict[str, List[Tuple[int, Path, _Found]]] = {}
    skipped: Dict[str, List[Path]] = {}
    undecided: List[WeightFileError] = []  # CLIP files that do not say which CLIP they are
    for path in files:
        h = _header(path)
        found = _classify(h, diffusers_context=False)
        for f in found:
            try:
                component = _which_clip(f, path, None, None) if f.component == "clip" else f.component
            except WeightFileError as e:
                undecided.append(e)
                continue
            if f.fp8:
                skipped.setdefault(component, []).append(path)
                continue
            candidates.setdefault(component, []).append((len(found), path, f))
    out: Dict[str, ComponentSource] = {}
    for component in wanted:
        options = candidates.get(component)
        if not options and undecided and component in ("clip_l", "clip_g"):
            raise undecided[0]
        if not options:
            if component in skipped:
                log.warning(
                    "%s: skipping %s for the %s: fp8 weights are not supported",
                    where, ", ".join(p.name for p in skipped[component]), _DESCRIPTION[component],
                )  # fmt: skip
            continue
        best = min(n for n, _, _ in options)
        chosen = [(p, f) for n, p, f in options if n == best]
        if len(chosen) > 1:
            raise WeightFileError(
                f"{where}: several files hold the {_DESCRIPTION[component]}: "
                f"{', '.join(str(p) for p, _ in chosen)}. Pass the path of the one you want."
            )
        path, f = chosen[0]
        out[component] = ComponentSource([path], f.layout, _known_clip_config(component, None))
    return out


def _sai_files(folder: Path) -> List[Path]:
    files = _safetensors_in(folder)
    te = folder / SAI_TEXT_ENCODERS_FOLDER
    if te.is_dir():
        files += _safetensors_in(te)
    return files


# ---- the entry point --------------------------------------------------------------------------
def is_converted_folder(path: Path) -> bool:
    return converted.is_converted(Path(path))


def describe_folder(folder: Path, limit: int = 12) -> str:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in Path(folder).iterdir())
    more = f", … ({len(entries)} entries)" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more if entries else "nothing (empty folder)"


def _check_components(components: Optional[Sequence[str]]) -> Tuple[str, ...]:
    wanted = tuple(components) if components is not None else COMPONENTS
    for c in wanted:
        check_component(c)
    return wanted


def resolve_components(
    path: str | Path, components: Optional[Sequence[str]] = None
) -> Dict[str, ComponentSource]:
    """{component: ComponentSource} for the networks found at `path` (any layout above).

    `components` limits the search (e.g. only "vae": other folders are not even opened).
    Components that are not there are absent from the result; raises `WeightFileError`
    when nothing usable is there, saying what was found and what is expected.
    """
    wanted = _check_components(components)
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightFileError(f"{path}: no such file or folder")
    if path.is_file():
        return _resolve_file(path, wanted)
    if is_converted_folder(path):
        raise SD35Error(
            f"{path} is a converted sd35_mlx folder; load it with sd35_mlx.load_transformer, "
            "load_vae or load_text_encoders (they read converted folders directly)."
        )
    out = _resolve_folder(path, wanted)
    log.debug("%s: %s", path, {c: [str(f) for f in s.files] for c, s in out.items()})
    return out


def _resolve_file(path: Path, wanted: Sequence[str]) -> Dict[str, ComponentSource]:
    if path.suffix != ".safetensors":
        read_header(path)  # refuses pickles with its own message
    # A shard of a diffusers component: the index next to it names all of them.
    indexes = [p for p in path.parent.glob("*.safetensors.index*.json") if path.name in p.read_text()]
    if indexes and path.parent.joinpath("config.json").is_file():
        component, source = _component_folder(path.parent)
        return {component: source} if component in wanted else {}
    # A component folder's own weight file (e.g. text_encoder/model.fp16.safetensors, asked
    # for by name): diffusers layout, with the folder's config.json.
    config_path = path.parent / "config.json"
    in_component_folder = path.stem.split(".")[0] in WEIGHT_STEMS and config_path.is_file()
    hf_config = _read_json(config_path) if in_component_folder else None
    h = _header(path)
    found = _classify(h, diffusers_context=in_component_folder)
    if not found:
        raise WeightFileError(f"{path}: not an SD3 checkpoint I know (tensors: {_key_sample(h)}). {EXPECTED}")
    out: Dict[str, ComponentSource] = {}
    for f in found:
        component = f.component
        if component == "clip":
            component = _which_clip(f, path, hf_config, _name_hint(path.parent.name))
        if component not in wanted:
            continue
        if f.fp8:
            if len(found) > 1:  # e.g. an all-in-one file with an fp8 T5 inside
                log.warning("%s: skipping its fp8 %s (not supported)", path, _DESCRIPTION[component])
                continue
            _refuse_fp8(f, [path])
        out[component] = ComponentSource([path], f.layout, _known_clip_config(component, hf_config))
    return out


def _resolve_folder(folder: Path, wanted: Sequence[str]) -> Dict[str, ComponentSource]:
    if is_diffusers_root(folder):
        out = _from_diffusers(folder, wanted)
        absent = _model_index_absent(folder)
        missing = [c for c in wanted if c not in out and c not in absent]
        if missing:  # e.g. the official repo's Stability file, for what the folders lack
            sai = _from_files(_sai_files(folder), missing, where=str(folder))
            for c, s in sai.items():
                log.info("%s: no diffusers %s folder; using %s", folder, DIFFUSERS_FOLDERS[c], s.files[0].name)
            out.update(sai)
        return out
    if (folder / "config.json").is_file():
        component, source = _component_folder(folder)
        return {component: source} if component in wanted else {}
    files = _sai_files(folder)
    if files:
        return _from_files(files, wanted, where=str(folder))
    pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        raise WeightFileError(
            f"{folder}: holds only pickle checkpoints ({', '.join(sorted(pickles))}), which sd35_mlx "
            "refuses to read (they can run arbitrary code). Use the .safetensors release."
        )
    raise WeightFileError(f"{folder}: no SD3 weights found; it holds {describe_folder(folder)}. {EXPECTED}")


def resolve_component(path: str | Path, component: str) -> ComponentSource:
    """The source of one network; an error saying what is there when it is missing."""
    _check_components([component])
    found = resolve_components(path, [component])
    if component in found:
        return found[component]
    path = Path(path).expanduser()
    others = resolve_components(path) if path.is_file() else _quiet_others(path)
    there = f"it holds {', '.join('the ' + _DESCRIPTION[c] for c in others)}" if others else "nothing usable"
    where = f"a {DIFFUSERS_FOLDERS[component]}/ folder" + (
        {"clip_l": " or text_encoders/clip_l.safetensors", "clip_g": " or text_encoders/clip_g.safetensors",
         "t5": " or text_encoders/t5xxl_fp16.safetensors"}.get(component, " or a Stability single file")
    )  # fmt: skip
    raise WeightFileError(
        f"{path}: no {_DESCRIPTION[component]} there ({there}). Expected {where}. If this is a "
        "partial download, download the missing component too."
    )


def _quiet_others(folder: Path) -> Dict[str, ComponentSource]:
    try:
        return resolve_components(folder)
    except SD35Error:
        return {}

