"""The converted sd35_mlx folder: our own parameter names, quantized or not, loaded as is.

    out/
      config.json                 format, version, per-network config + quantization + files
      transformer.safetensors     tensors named exactly tree_flatten(model.parameters())
      clip_l.safetensors  clip_g.safetensors  t5.safetensors  vae.safetensors
      (big networks: transformer-00001-of-00004.safetensors … + transformer.safetensors.index.json)
      tokenizer/  tokenizer_2/  tokenizer_3/  scheduler/   copied from the source
      README.md                   model card: source, license, how it was made
      LICENSE.md …                the source's license files, copied

config.json (format_version 1):
    {"format": "sd35_mlx", "format_version": 1, "sd35_mlx_version": "0.1.0",
     "variant": "sd3.5-large" | null, "dtype": "bfloat16",
     "components": {"t5": {"class": "T5Encoder", "config": {...}, "options": {},
                           "dtype": "bfloat16", "quantization": {"bits": 4, "group_size": 64,
                           "mode": "affine", "keep": [...], "rule": "..."} | null,
                           "files": ["t5.safetensors"], "parameters": 4762310656,
                           "bytes": 2870000000}, ...},
     "tokenizers": {"clip_l": "tokenizer", ...}, "source": {...}, "t5": "present"}

Loading rebuilds each network from its config, applies the stored quantization rule (the
same code path that made the file), and loads the tensors strictly and lazily (`mx.load`:
nothing is read until used). A folder written by a newer format version is refused with a
message that says what to do (mflux #149: an unversioned quantized format broke users).

Writing is atomic: everything goes to `.<name>.tmp-<pid>` beside the target and is renamed
into place only when complete; an existing folder is replaced only with `force`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .._version import __version__
from ..components import COMPONENTS, SIDE_NETWORKS, TOKENIZER_FOLDERS, check_component, component_dtype, dtype_name, network_classes
from ..errors import InputError, SD35Error, WeightFileError
from ..quantize import QuantSpec, quantizable_layers, quantize_network, quantized_paths, spec_of
from .model_card import model_card
from .mapping import check_against_model
from .safetensors_file import load_tensors

log = logging.getLogger(__name__)

FORMAT = "sd35_mlx"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # like mlx-lm: shards of at most ~5 GB
LICENSE_FILE = re.compile(r"(LICEN[CS]E|COPYING|NOTICE)([.-].*)?\Z", re.IGNORECASE)

NetworkOrLoader = Union[nn.Module, Callable[[], nn.Module]]


# ---- networks <-> configs ---------------------------------------------------------------------
def network_options(component: str, model: nn.Module) -> dict:
    """Constructor options beyond the config (the VAE may be decoder-only)."""
    return {"with_encoder": "encoder" in model} if component == "vae" else {}


def build_network(component: str, config: Mapping, options: Optional[Mapping] = None,
                  source: str = "config.json") -> nn.Module:  # fmt: skip
    """A fresh network (lazily initialised: no memory is used until evaluated)."""
    network_cls, config_cls = network_classes(component)
    try:
        cfg = config_cls.from_dict(dict(config))
        return network_cls(cfg, **dict(options or {}))
    except (TypeError, ValueError) as e:
        raise WeightFileError(f"{source}: the {component} config is not valid: {e}") from None


def float_dtype(model: nn.Module) -> Optional[mx.Dtype]:
    """The floating dtype of a network's parameters (the most common one)."""
    counts: Dict[mx.Dtype, int] = {}
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            counts[v.dtype] = counts.get(v.dtype, 0) + v.size
    return max(counts, key=counts.get) if counts else None


def logical_parameters(model: nn.Module) -> int:
    """Parameters as if unquantized (a 4-bit weight still counts as one parameter)."""
    total = 0
    for path, module in model.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            total += module.weight.shape[0] * module.weight.shape[1] * 32 // module.bits
            total += module.bias.size if "bias" in module else 0
    quantized = {p for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
    for key, v in tree_flatten(model.parameters()):
        if key.rsplit(".", 1)[0] not in quantized:
            total += v.size
    return total


def stored_bytes(model: nn.Module) -> int:
    """Bytes the network's tensors take on disk (shapes and dtypes only: nothing is evaluated)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# ---- the config file ---------------------------------------------------------------------------
def is_converted(path: Union[str, os.PathLike]) -> bool:
    """Whether `path` is a converted sd35_mlx folder (any format version)."""
    p = Path(path)
    cfg = p / CONFIG_FILE
    if not (p.is_dir() and cfg.is_file()):
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def read_converted_config(folder: Union[str, os.PathLike]) -> dict:
    """config.json of a converted folder, after checking that this version can read it."""
    folder = Path(folder)
    if not is_converted(folder):
        raise WeightFileError(f"{folder}: not a converted sd35_mlx folder (no config.json with format 'sd35_mlx')")
    data = json.loads((folder / CONFIG_FILE).read_text())
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise WeightFileError(f"{folder}/config.json: invalid format_version {version!r}; convert the model again")
    if version > FORMAT_VERSION:
        made_by = data.get("sd35_mlx_version", "a newer version")
        raise WeightFileError(
            f"{folder} was written by sd35_mlx {made_by} in converted-format version {version}; "
            f"this sd35_mlx ({__version__}) reads up to version {FORMAT_VERSION}. Upgrade sd35_mlx "
            "(git pull in its clone, then pip install .), or convert the original model again with this version."
        )
    if not isinstance(data.get("components"), dict):
        raise WeightFileError(f"{folder}/config.json: no 'components' table; convert the model again")
    for component, entry in data["components"].items():
        _check_entry(folder, component, entry)
    for key, kind in (("variant", str), ("t5", str), ("tokenizers", dict), ("source", dict), ("dtype", str)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            raise WeightFileError(f"{folder}/config.json: '{key}' must be a {kind.__name__} (got {data[key]!r:.60})")
    return data


def _check_entry(folder: Path, component: str, entry) -> None:
    """A components entry of config.json, field by field (the file may have been edited)."""
    where = f"{folder}/config.json: components.{component}"
    if component not in COMPONENTS + SIDE_NETWORKS:
        raise WeightFileError(f"{where}: unknown component (known: {', '.join(COMPONENTS + SIDE_NETWORKS)})")
    if not isinstance(entry, dict):
        raise WeightFileError(f"{where} must be an object (got {entry!r:.60})")
    if not isinstance(entry.get("config"), dict):
        raise WeightFileError(f"{where}.config must be an object (got {entry.get('config')!r:.60})")
    if not isinstance(entry.get("options", {}), dict):
        raise WeightFileError(f"{where}.options must be an object (got {entry.get('options')!r:.60})")
    files = entry.get("files")
    # Plain names only: a path in a hand-edited config must not make us read files elsewhere.
    if not isinstance(files, list) or not all(isinstance(f, str) and f and Path(f).name == f and f not in (".", "..") for f in files):
        raise WeightFileError(f"{where}.files must be a list of file names inside the folder (got {files!r:.80})")
    if entry.get("dtype") is not None and entry["dtype"] not in ("bfloat16", "float16", "float32"):
        raise WeightFileError(f"{where}.dtype must be bfloat16, float16 or float32 (got {entry['dtype']!r:.60})")
    for key in ("parameters", "bytes"):
        value = entry.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise WeightFileError(f"{where}.{key} must be a whole number ≥ 0 (got {value!r:.60})")
    quant = entry.get("quantization")
    if quant is not None:
        try:
            QuantSpec.from_dict(quant)
        except InputError as e:
            raise WeightFileError(f"{where}.quantization: {e}") from None


def converted_components(folder: Union[str, os.PathLike]) -> List[str]:
    return [c for c in COMPONENTS if c in read_converted_config(folder)["components"]]


# ---- loading -------------------------------------------------------------------------------------
def _component_entry(folder: Path, config: dict, component: str) -> dict:
    check_component(component)
    entry = config["components"].get(component)
    if entry is None:
        there = ", ".join(c for c in COMPONENTS if c in config["components"]) or "nothing"
        hint = " (it was converted with --drop-t5)" if component == "t5" and config.get("t5") == "dropped" else ""
        raise WeightFileError(f"{folder}: this converted folder has no {component}{hint}; it holds {there}.")
    return entry


def _weight_files(folder: Path, entry: dict, component: str) -> List[Path]:
    files = [folder / f for f in entry.get("files", []) if not f.endswith(".json")]
    if not files:
        raise WeightFileError(f"{folder}/config.json lists no weight files for the {component}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise WeightFileError(
            f"{folder}: the {component}'s weight file(s) {', '.join(missing)} are missing; the folder "
            "is incomplete (interrupted copy or download?). Copy or download it again."
        )
    return files


def _read_tensors(files: Sequence[Path]) -> Dict[str, mx.array]:
    merged: Dict[str, mx.array] = {}
    for f in files:
        for k, v in load_tensors(f).items():
            if k in merged:
                raise WeightFileError(f"tensor '{k}' appears in two shards, the second being {f}")
            merged[k] = v
    return merged


def _cast(weights: Dict[str, mx.array], dtype: Optional[mx.Dtype]) -> Dict[str, mx.array]:
    if dtype is None:
        return weights
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype else v
            for k, v in weights.items()}  # fmt: skip


def load_converted_component(
    folder: Union[str, os.PathLike], component: str, dtype: Optional[mx.Dtype] = None
) -> nn.Module:
    """Build `component` from the folder's config.json, apply its quantization and load its
    tensors strictly and lazily. `dtype` (None: as stored) casts the floating tensors; a
    quantized layer's scales follow it. T5 is never loaded in float16 (bfloat16 instead)."""
    folder = Path(folder)
    config = read_converted_config(folder)
    entry = _component_entry(folder, config, component)
    dtype = component_dtype(component, dtype)
    model = build_network(component, entry["config"], entry.get("options"), source=f"{folder}/{CONFIG_FILE}")
    quant = entry.get("quantization")
    if quant is not None:
        quantize_network(model, QuantSpec.from_dict(quant), component)
    files = _weight_files(folder, entry, component)
    weights = _read_tensors(files)
    layout = f"sd35_mlx converted {component} (format {config['format_version']})"
    check_against_model(model, weights, layout=layout, files=[str(f) for f in files])
    model.load_weights(list(_cast(weights, dtype).items()), strict=True)
    return model


# ---- writing -------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_folder_for(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{os.getpid()}"


def _leftovers(target: Path) -> Dict[str, List[Path]]:
    """What killed conversions (SIGKILL, power loss) left beside `target`, by kind; folders of
    live processes (another conversion running now) are not listed."""
    found: Dict[str, List[Path]] = {"tmp": [], "old": [], "trash": []}
    if not target.parent.is_dir():
        return found
    pattern = re.compile(re.escape(f".{target.name}.") + r"(tmp|old|trash)-(\d+)\Z")
    for p in target.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            found[m.group(1)].append(p)
    return found


def recover_interrupted(target: Path) -> None:
    """Finish or undo a conversion that was killed beside `target`; never delete the only copy.

    - `.old-PID` is the previous `target`, moved aside by the swap (`_swap_in`). With `target`
      missing, the kill came between the swap's two renames: it is the only copy, so it is
      renamed back. With `target` present the swap was done and it is redundant: it is renamed
      to `.trash-PID` first, so that a kill while deleting it never leaves a half-deleted
      folder under a name this function would restore.
    - `.trash-PID` is a replaced folder being deleted: removed.
    - `.tmp-PID` is a new folder that was never swapped in (incomplete, or complete but not
      confirmed): removed; the sources it came from are untouched.
    """
    found = _leftovers(target)
    olds = sorted(found["old"], key=lambda p: p.stat().st_mtime)
    if olds and not (target.exists() or target.is_symlink()):
        newest = olds.pop()
        log.warning("restoring %s from %s, left by a conversion killed while replacing it", target, newest)
        os.replace(newest, target)
    for old in olds:
        trash = old.with_name(old.name.replace(".old-", ".trash-", 1))
        os.replace(old, trash)
        found["trash"].append(trash)
    for p in found["tmp"] + found["trash"]:
        log.info("removing %s, left by an interrupted conversion", p)
        _remove(p)


def check_target(target: Union[str, os.PathLike], force: bool) -> Path:
    """Refuse to touch an existing output unless `force` (before anything is loaded).

    Even with `force`, only a converted folder (or an empty one) is replaced: a typo such as
    `--mlx-path . --force` must not delete the user's files.
    """
    target = Path(target).expanduser()
    recover_interrupted(target.absolute())  # a killed swap may have left the only copy aside
    if not (target.exists() or target.is_symlink()):
        return target
    if not force:
        raise InputError(
            f"{target} already exists; it was not touched. Choose another --mlx-path, or pass "
            "--force to replace it (the old folder is replaced only once the new one is complete)."
        )
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        raise InputError(f"refusing to replace {target}: it is the current folder, one above it, or the home folder")
    empty = target.is_dir() and not target.is_symlink() and not any(target.iterdir())
    if not (empty or is_converted(target)):
        raise InputError(
            f"{target} exists and is not a converted sd35_mlx folder; --force only replaces converted "
            "folders (or empty ones). It was not touched: remove it yourself or choose another --mlx-path."
        )
    return target


@contextmanager
def atomic_folder(target: Union[str, os.PathLike], force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it becomes `target`, on any failure
    (exception, Ctrl-C) it is removed and `target` is left as it was."""
    target = check_target(target, force).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder_for(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, target: Path) -> None:
    """Make the complete `tmp` the `target`. A SIGKILL between any two lines leaves a state
    `recover_interrupted` resolves without loss (the reason is given at each step)."""
    if not (target.exists() or target.is_symlink()):
        os.replace(tmp, target)  # atomic: before it the old state, after it the new one
        return
    # rename(2) cannot replace a non-empty folder: move the old one aside first.
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.replace(target, old)  # killed after this: no target, so `old` (the only copy) is restored
    try:
        os.replace(tmp, target)  # killed after this: target complete, `old` redundant
    except BaseException:
        os.replace(old, target)
        raise
    trash = target.parent / f".{target.name}.trash-{os.getpid()}"
    os.replace(old, trash)  # only now may it be deleted: `.trash-` is never restored
    _remove(trash)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _shards(items: Sequence[Tuple[str, mx.array]], max_bytes: int) -> List[List[Tuple[str, mx.array]]]:
    shards: List[List[Tuple[str, mx.array]]] = [[]]
    size = 0
    for key, value in items:
        if shards[-1] and size + value.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, value))
        size += value.nbytes
    return shards


def write_network(
    folder: Path, component: str, items: List[Tuple[str, mx.array]], quantization: Optional[QuantSpec],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> List[str]:  # fmt: skip
    """Write one network's tensors, `tree_flatten(model.parameters())`, sharded above
    `max_shard_bytes`; returns the file names.

    Shards are evaluated and written one at a time and `items` is emptied as they go: when
    nothing else references the network, a written shard's memory is released before the
    next one is computed, so peak memory is about one shard, not the whole network.
    """
    metadata = {
        "format": "mlx",
        "sd35_mlx_format": FORMAT,
        "sd35_mlx_format_version": str(FORMAT_VERSION),
        "component": component,
        "quantization": json.dumps(quantization.to_dict() if quantization else None),
    }
    shards = _shards(items, max_shard_bytes)
    items.clear()
    if len(shards) == 1:
        names = [f"{component}.safetensors"]
    else:
        names = [f"{component}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: Dict[str, str] = {}
    total = 0
    for name in names:
        shard = dict(shards.pop(0))  # drop our reference once written
        mx.save_safetensors(str(folder / name), shard, metadata=metadata)
        weight_map.update({k: name for k in shard})
        total += sum(v.nbytes for v in shard.values())
        del shard
    if len(names) > 1:
        index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
        index_name = f"{component}.safetensors.index.json"
        (folder / index_name).write_text(json.dumps(index, indent=1) + "\n")
        names.append(index_name)
    return names


def _check_quantization(component: str, model: nn.Module, spec: Optional[QuantSpec],
                        config: Mapping, options: Mapping) -> None:  # fmt: skip
    """The stored rule must rebuild exactly the quantized layers the network has."""
    found = spec_of(model)
    if spec is None:
        if found is not None:
            raise SD35Error(f"the {component} is quantized ({found}) but no quantization spec was given")
        return
    if found is not None and found != (spec.bits, spec.group_size, spec.mode):
        raise SD35Error(f"the {component} is quantized as {found}, not as the spec says ({spec})")
    fresh = build_network(component, config, options)
    expected = quantizable_layers(fresh, spec)
    actual = quantized_paths(model)
    if expected != actual:
        raise SD35Error(
            f"the {component}'s quantized layers do not follow the rule of its spec: "
            f"{len(actual)} quantized, the rule gives {len(expected)}; it could not be reloaded"
        )


def _copy_folders(out: Path, source_root: Optional[Path], names: Sequence[str]) -> List[str]:
    copied = []
    if source_root is None:
        return copied
    for name in names:
        src = source_root / name
        if src.is_dir():
            shutil.copytree(src, out / name, ignore=shutil.ignore_patterns(".*"))
            copied.append(name)
    return copied


def license_files(folder: Optional[Path]) -> List[Path]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and LICENSE_FILE.match(p.name))


def save_converted(
    out_dir: Union[str, os.PathLike],
    networks: Mapping[str, NetworkOrLoader],
    *,
    quantization: Optional[Mapping[str, Optional[QuantSpec]]] = None,
    dtype: Optional[str] = None,
    variant: Optional[str] = None,
    source: Optional[dict] = None,
    source_root: Optional[Union[str, os.PathLike]] = None,
    license_paths: Sequence[Union[str, os.PathLike]] = (),
    source_card: Optional[str] = None,
    t5: Optional[str] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    on_written: Optional[Callable[[str, dict], None]] = None,
    upload_repo: Optional[str] = None,
) -> Path:
    """Write a converted folder atomically at `out_dir`; returns its path.

    networks: {component: network, or a zero-argument function returning it}. A function
      is called when its network is written and its result dropped afterwards, so only one
      network is alive at a time (what `convert` does for big models).
    quantization: {component: QuantSpec or None}; a network not yet quantized is quantized
      here; an already quantized one must match its spec.
    source_root: where tokenizer/, tokenizer_2/, tokenizer_3/ and scheduler/ are copied from
      (and license files, unless `license_paths` names them).
    source_card: the source's README.md text (for its license fields); t5: "present",
      "dropped" or "absent" (default: from whether a "t5" network is given).
    on_written(component, entry): called after each network is written (for progress).
    """
    quantization = dict(quantization or {})
    for c in networks:
        check_component(c)
    if max_shard_bytes <= 0:
        raise InputError("max_shard_bytes must be positive")
    root = Path(source_root) if source_root is not None else None
    with atomic_folder(out_dir, force=force) as tmp:
        entries: Dict[str, dict] = {}
        for component in [c for c in COMPONENTS if c in networks]:
            net = networks[component]
            model = net() if callable(net) and not isinstance(net, nn.Module) else net
            spec = quantization.get(component)
            config = model.config.to_dict()
            options = network_options(component, model)
            if spec is not None and spec_of(model) is None:
                quantize_network(model, spec, component)
            _check_quantization(component, model, spec, config, options)
            entry = {
                "class": type(model).__name__,
                "config": config,
                "options": options,
                "dtype": dtype_name(float_dtype(model)),
                "quantization": spec.to_dict() if spec else None,
                "parameters": logical_parameters(model),
                "bytes": stored_bytes(model),
            }
            items = tree_flatten(model.parameters())
            del model  # from here on `items` holds the only references (for loaders)
            entry["files"] = write_network(tmp, component, items, spec, max_shard_bytes)
            entries[component] = entry
            if on_written is not None:
                on_written(component, entry)
        # tokenizer_3 only with T5: without it, a pipeline asked for T5 says so clearly
        tokenizer_names = [TOKENIZER_FOLDERS[c] for c in ("clip_l", "clip_g") + (("t5",) if "t5" in networks else ())]
        copied = _copy_folders(tmp, root, tokenizer_names + ["scheduler"])
        licenses = [Path(p) for p in license_paths] or license_files(root)
        for p in licenses:
            shutil.copyfile(p, tmp / p.name)
        t5_state = t5 or ("present" if "t5" in networks else "absent")
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sd35_mlx_version": __version__,
            "variant": variant,
            "dtype": dtype,
            "components": entries,
            "tokenizers": {c: TOKENIZER_FOLDERS[c] for c in ("clip_l", "clip_g", "t5")
                           if TOKENIZER_FOLDERS[c] in copied},  # fmt: skip
            "source": source or {},
            "t5": t5_state,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(
            model_card(config, source_card=source_card, license_names=[p.name for p in licenses],
                       upload_repo=upload_repo)  # fmt: skip
        )
    return Path(out_dir).expanduser()


__all__ = [
    "FORMAT", "FORMAT_VERSION", "DEFAULT_MAX_SHARD_BYTES", "is_converted", "read_converted_config",
    "converted_components", "load_converted_component", "save_converted", "build_network",
    "atomic_folder", "check_target", "write_network", "stored_bytes", "logical_parameters",
]  # fmt: skip
