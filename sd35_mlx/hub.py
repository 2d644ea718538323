"""From a Hugging Face repo id to a local folder, downloading only what is needed.

`resolve_model_path("stabilityai/stable-diffusion-3.5-medium", components=("vae",))` fetches
`model_index.json`, `scheduler/` and `vae/` into the standard Hugging Face cache (resumable;
the token comes from `token=`, `HF_TOKEN` or `hf auth login`) and returns the snapshot folder.
The file list decides the layout: when the repo has the diffusers folders, neither the
Stability single file, nor `text_encoders/`, nor `vae copy/`, nor the `*.fp16*` duplicates
are downloaded. A converted sd35_mlx repo gives the files its config.json lists for the
requested networks. A local path is returned as it is.

Every failure becomes an `SD35Error` that says what to do (gated licence, login, typo,
offline without a cached copy).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from .errors import SD35Error
from .components import COMPONENTS, DIFFUSERS_FOLDERS, TOKENIZER_FOLDERS
from .weights.layouts import SAI_TEXT_ENCODERS_FOLDER
from .weights.safetensors_file import PICKLE_SUFFIXES, refuse_pickle

log = logging.getLogger(__name__)

ALL_COMPONENTS = COMPONENTS + ("tokenizers",)
OFFICIAL_REPOS = (
    "stabilityai/stable-diffusion-3.5-large",
    "stabilityai/stable-diffusion-3.5-large-turbo",
    "stabilityai/stable-diffusion-3.5-medium",
    "stabilityai/stable-diffusion-3-medium-diffusers",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FP16 = re.compile(r"\.fp16[.-]")
_SAI_TEXT_FILES = {
    "clip_l": ("clip_l.safetensors",),
    "clip_g": ("clip_g.safetensors",),
    "t5": ("t5xxl_fp16.safetensors", "t5xxl.safetensors", "t5xxl_fp32.safetensors"),
}  # fmt: skip


# ---- which files a component needs, from the repo's file list --------------------------------
def _weights_in(folder: str, files: Sequence[str]) -> List[str]:
    """A diffusers component folder's weights: the index and its shards, or the single file."""
    inside = {f[len(folder) + 1:] for f in files if f.startswith(folder + "/") and "/" not in f[len(folder) + 1:]}
    for variant in ("", ".fp16"):
        for stem in ("diffusion_pytorch_model", "model"):
            index = f"{stem}.safetensors.index{variant}.json"
            if index in inside:
                shard = re.compile(re.escape(stem + variant) + r"-\d{5}-of-\d{5}\.safetensors\Z")
                return [index] + sorted(n for n in inside if shard.match(n))
            if f"{stem}{variant}.safetensors" in inside:
                return [f"{stem}{variant}.safetensors"]
    return []


def _sai_checkpoint(files: Sequence[str]) -> Optional[str]:
    """The Stability single file at the top of a repo; a plain one before *incl_clips*/fp8 ones."""
    top = [f for f in files if "/" not in f and f.endswith(".safetensors")]
    plain = [f for f in top if "incl" not in f.lower() and "fp8" not in f.lower()]
    choice = plain if plain else top
    if len(choice) > 1:
        raise SD35Error(
            f"the repo holds several single-file checkpoints ({', '.join(sorted(choice))}) and no "
            "diffusers folders, so it is not clear which one to download. Download the one you "
            "want (e.g. `hf download <repo> <file>`) and pass its local path."
        )
    return choice[0] if choice else None


def repo_layout(files: Sequence[str]) -> str:
    """"diffusers", "stability", "converted" (sd35_mlx), "component" or "unknown", from a file list."""
    # a converted sd35_mlx folder (sd35_mlx/weights/converted.py): config.json + <network>.safetensors
    if "config.json" in files and any(f in files for n in COMPONENTS
                                      for f in (f"{n}.safetensors", f"{n}.safetensors.index.json")):  # fmt: skip
        return "converted"
    component_weights = [f"{stem}.safetensors{tail}" for stem in ("diffusion_pytorch_model", "model")
                         for tail in ("", ".index.json")]  # fmt: skip
    if "config.json" in files and any(f in files for f in component_weights):
        return "component"  # one diffusers component folder published as a repo
    if "model_index.json" in files or any(f"{sub}/config.json" in files for sub in DIFFUSERS_FOLDERS.values()):
        return "diffusers"
    if any("/" not in f and f.endswith(".safetensors") for f in files) or any(
        f.startswith(SAI_TEXT_ENCODERS_FOLDER + "/") for f in files
    ):
        return "stability"
    return "unknown"


def _converted_files(files: Sequence[str], components: Sequence[str], config: Optional[dict]) -> List[str]:
    """A converted sd35_mlx repo: config.json, scheduler/, and the requested networks' files
    (as its config.json lists them; without it, by the converter's file naming)."""
    wanted = ["config.json"] + [f for f in files if f.startswith("scheduler/")]
    entries = (config or {}).get("components", {})
    for component in components:
        if component == "tokenizers":
            folders = set((config or {}).get("tokenizers", {}).values()) or set(TOKENIZER_FOLDERS.values())
            wanted += [f for f in files if f.split("/")[0] in folders]
        elif component in entries:
            wanted += [f for f in entries[component].get("files", []) if f in files]
        elif config is None:
            tail = r"(\.safetensors|-\d{5}-of-\d{5}\.safetensors|\.safetensors\.index\.json)\Z"
            own = re.compile(re.escape(component) + tail)
            wanted += [f for f in files if own.match(f)]
    return sorted(dict.fromkeys(wanted))


def files_to_download(
    files: Sequence[str], components: Iterable[str] = ALL_COMPONENTS, converted_config: Optional[dict] = None
) -> List[str]:
    """The exact repo files the requested components need (see the module docstring).

    `converted_config`: the config.json of a converted sd35_mlx repo, when already fetched.
    """
    components = tuple(components)
    unknown = [c for c in components if c not in ALL_COMPONENTS]
    if unknown:
        raise SD35Error(f"unknown component(s) {unknown}; choose from {', '.join(ALL_COMPONENTS)}")
    present = set(files)
    layout = repo_layout(files)
    wanted: List[str] = []
    if layout == "converted":
        return _converted_files(files, components, converted_config)
    if layout in ("component", "unknown"):  # e.g. one component's folder: all but pickles and fp16 copies
        return sorted(f for f in files if Path(f).suffix.lower() not in PICKLE_SUFFIXES and not _FP16.search(f))
    if layout == "diffusers":
        wanted += [f for f in ("model_index.json",) if f in present]
        wanted += [f for f in files if f.startswith("scheduler/")]
    missing_sai = []
    for component in components:
        if component == "tokenizers":
            wanted += [f for f in files if f.split("/")[0] in TOKENIZER_FOLDERS.values() and f.count("/") == 1]
            continue
        folder = DIFFUSERS_FOLDERS[component]
        weights = _weights_in(folder, files) if layout == "diffusers" else []
        if weights:
            wanted += [f"{folder}/config.json"] if f"{folder}/config.json" in present else []
            wanted += [f"{folder}/{w}" for w in weights]
        else:
            missing_sai.append(component)
    for component in missing_sai:  # a Stability repo, or a diffusers repo lacking this folder
        if component in ("transformer", "vae"):
            single = _sai_checkpoint(files)
            wanted += [single] if single else []
        else:
            names = [f"{SAI_TEXT_ENCODERS_FOLDER}/{n}" for n in _SAI_TEXT_FILES[component]]
            wanted += [n for n in names if n in present][:1]
    return sorted(dict.fromkeys(wanted))


# ---- errors -----------------------------------------------------------------------------------
def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _have_token(token: Optional[str]) -> bool:
    if token:
        return True
    try:
        from huggingface_hub import get_token
    except ImportError:  # very old huggingface_hub
        from huggingface_hub import HfFolder

        return HfFolder.get_token() is not None
    return get_token() is not None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _gated_message(repo_id: str, token: Optional[str]) -> str:
    url = f"{_endpoint()}/{repo_id}"
    if not _have_token(token):
        who = (
            "No Hugging Face token was found (none passed, no HF_TOKEN variable, not logged in). "
            "Run `hf auth login` (or set HF_TOKEN) with the account that accepted the licence."
        )
    else:
        who = (
            "A token was sent, but its account has not been granted access yet: accept the licence "
            "with that same account, or log in with the one that did (`hf auth login`)."
        )
    return (
        f"{repo_id} is a gated model: its licence must be accepted before it can be downloaded. "
        f"Open {url} , log in and accept the licence there. {who}"
    )


def _not_found_message(repo_id: str, revision: Optional[str]) -> str:
    return (
        f"'{repo_id}' was not found on the Hugging Face Hub ({_endpoint()}), or it is private. "
        f"Check the spelling; the official repos are {', '.join(OFFICIAL_REPOS)}. If it is a "
        "private repo, log in first (`hf auth login`). If you meant a local path, no such file "
        f"or folder exists: {Path(repo_id).expanduser().absolute()}."
    )


def _offline_message(repo_id: str, components: Sequence[str], reason: str) -> str:
    from huggingface_hub import constants

    how = "unset HF_HUB_OFFLINE and run" if _offline() else "run"
    return (
        f"{reason} and {repo_id} ({', '.join(components)}) is not in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}). To download it, {how} the same command once with network "
        "access; or pass the path of a local copy of the model instead of the repo id."
    )


def _translate(e: BaseException, repo_id: str, revision: Optional[str], token: Optional[str],
               components: Sequence[str]) -> SD35Error:  # fmt: skip
    """A huggingface_hub failure as an actionable SD35Error."""
    from huggingface_hub import errors as hf_errors

    def is_a(name: str) -> bool:
        cls = getattr(hf_errors, name, None)
        return cls is not None and isinstance(e, cls)

    if is_a("GatedRepoError"):
        return SD35Error(_gated_message(repo_id, token))
    if is_a("RevisionNotFoundError"):
        return SD35Error(
            f"{repo_id} has no revision '{revision}' (branch, tag or commit). Check it on "
            f"{_endpoint()}/{repo_id} or leave the revision out for the main branch."
        )
    if is_a("RepositoryNotFoundError"):
        return SD35Error(_not_found_message(repo_id, revision))
    if is_a("IncompleteSnapshotError") or is_a("LocalEntryNotFoundError") or is_a("OfflineModeIsEnabled"):
        reason = "HF_HUB_OFFLINE=1 is set" if _offline() else "the Hugging Face Hub could not be reached"
        return SD35Error(_offline_message(repo_id, components, reason) + f" ({_first_line(e)})")
    if is_a("HfHubHTTPError"):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            return SD35Error(
                f"access to {repo_id} was refused ({status}). If it is gated, accept its licence at "
                f"{_endpoint()}/{repo_id} ; then log in with `hf auth login` (or set HF_TOKEN)."
            )
        return SD35Error(f"the Hugging Face Hub answered {repo_id} with an error: {_first_line(e)}. Try again later.")
    if isinstance(e, OSError) or type(e).__module__.startswith(("httpx", "requests", "urllib3")):
        return SD35Error(
            f"downloading {repo_id} failed: {_first_line(e)}. Check your network connection (and "
            "disk space), then run again: finished files are kept and the download resumes. Or "
            "pass the path of a local copy of the model."
        )
    return SD35Error(f"downloading {repo_id} failed: {_first_line(e)}")


# ---- listing the repo's files, online or from the cache ----------------------------------------
def _is_connection_error(e: BaseException) -> bool:
    from huggingface_hub import errors as hf_errors

    offline_cls = getattr(hf_errors, "OfflineModeIsEnabled", None)
    if offline_cls is not None and isinstance(e, offline_cls):
        return True
    name = type(e).__name__
    module = type(e).__module__
    return module.startswith(("httpx", "requests", "urllib3")) and (
        "Connect" in name or "Timeout" in name or "Network" in name
    )


def _list_online(repo_id: str, revision: Optional[str], token: Optional[str]) -> List[str]:
    """The repo's files from its model info (one request; the listing call would retry for
    half a minute when the network is down)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    siblings = api.model_info(repo_id, revision=revision).siblings
    if siblings is None:
        return list(api.list_repo_files(repo_id, revision=revision))
    return [s.rfilename for s in siblings]


def _list_cached(repo_id: str, revision: Optional[str]) -> Optional[List[str]]:
    """The repo's file list as cached by an earlier download, or None."""
    from huggingface_hub import constants

    try:
        from huggingface_hub import get_cached_repo_tree  # huggingface_hub >= 2
    except ImportError:
        get_cached_repo_tree = None
    if get_cached_repo_tree is not None:
        try:
            return [f.path for f in get_cached_repo_tree(repo_id, revision=revision)]
        except Exception:  # no cached tree: fall back to the snapshot folder itself
            pass
    storage = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    commit = rev if re.fullmatch(r"[0-9a-f]{40}", rev) else None
    ref = storage / "refs" / rev
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        return None
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _looks_like_path(text: str) -> bool:
    """Repo ids are `owner/name`; anything else path-like is reported as a missing path."""
    return (
        text.startswith(("/", "./", "../", "~", "."))
        or "\\" in text
        or text.count("/") > 1
        or text.lower().endswith((".safetensors", ".json") + PICKLE_SUFFIXES)
    )


def resolve_model_path(
    repo_or_path: str | os.PathLike,
    revision: Optional[str] = None,
    components: Sequence[str] = ALL_COMPONENTS,
    token: Optional[str] = None,
) -> Path:
    """A local path to the model: `repo_or_path` itself if it exists, else a Hub snapshot.

    `components` (any of "transformer", "vae", "clip_l", "clip_g", "t5", "tokenizers")
    limits the download to what those need. Works offline from the cache
    (HF_HUB_OFFLINE=1) once downloaded.
    """
    text = os.fspath(repo_or_path)
    local = Path(text).expanduser()
    if local.exists():
        if local.is_file():
            refuse_pickle(local)
        return local
    if _looks_like_path(text) or not _REPO_ID.match(text):
        raise SD35Error(
            f"{local.absolute()}: no such file or folder"
            + ("" if _looks_like_path(text) else " (and it is not a Hugging Face repo id, "
               "which looks like 'stabilityai/stable-diffusion-3.5-medium')")
        )  # fmt: skip
    return _download(text, revision, tuple(components), token)


def _repo_files(repo_id: str, revision: Optional[str], token: Optional[str],
                components: Sequence[str]) -> Tuple[List[str], bool, str]:  # fmt: skip
    """(the repo's files, whether to stay offline, why offline), online or from the cache."""
    offline = _offline()
    files: Optional[List[str]] = None
    reason = "HF_HUB_OFFLINE=1 is set"
    if not offline:
        try:
            files = _list_online(repo_id, revision, token)
        except Exception as e:
            if not _is_connection_error(e):
                raise _translate(e, repo_id, revision, token, components) from None
            reason = f"the Hugging Face Hub could not be reached ({_first_line(e)})"
            log.warning("%s; trying the local cache for %s", reason, repo_id)
            offline = True
    if files is None:
        files = _list_cached(repo_id, revision)
        if files is None:
            raise SD35Error(_offline_message(repo_id, components, reason))
    return files, offline, reason


def resolve_file(repo_id: str, filename: Optional[str] = None, revision: Optional[str] = None,
                 token: Optional[str] = None, what: str = "LoRA") -> Path:  # fmt: skip
    """One .safetensors file of a repo (cached, offline-aware): `filename`, or the repo's only one."""
    if not _REPO_ID.match(repo_id):
        raise SD35Error(f"'{repo_id}' is neither an existing file nor a Hugging Face repo id ('owner/name')")
    files, offline, reason = _repo_files(repo_id, revision, token, (what,))
    safetensors = sorted(f for f in files if f.endswith(".safetensors"))
    if filename is None:
        if len(safetensors) != 1:
            pickles = [f for f in files if Path(f).suffix.lower() in PICKLE_SUFFIXES]
            found = (f"several .safetensors files ({', '.join(safetensors[:12])})" if safetensors else
                     "no .safetensors file" + (f" (only pickles, which are refused: {', '.join(pickles[:5])})" if pickles else ""))  # fmt: skip
            raise SD35Error(f"{repo_id} has {found}; name the {what} file as {repo_id}:<file>")
        filename = safetensors[0]
    refuse_pickle(Path(filename))
    if filename not in files:
        raise SD35Error(
            f"{repo_id} has no file '{filename}'; its .safetensors files are: {', '.join(safetensors[:12]) or 'none'}"
        )
    return _snapshot(repo_id, revision, [filename], token, offline, (what,), reason) / filename


def _download(repo_id: str, revision: Optional[str], components: Sequence[str], token: Optional[str]) -> Path:
    files, offline, reason = _repo_files(repo_id, revision, token, components)
    converted_config = None
    if repo_layout(files) == "converted":  # its config.json says which files hold which network
        folder = _snapshot(repo_id, revision, ["config.json"], token, offline, components, reason)
        converted_config = json.loads((folder / "config.json").read_text())
    wanted = files_to_download(files, components, converted_config)
    if not wanted:
        raise SD35Error(
            f"{repo_id} has none of the files for {', '.join(components)}: it has "
            f"{', '.join(sorted(files)[:12])}{' …' if len(files) > 12 else ''}. Is it an SD3 / SD3.5 model?"
        )
    log.info("%s: needs %d files: %s", repo_id, len(wanted), ", ".join(wanted))
    return _snapshot(repo_id, revision, wanted, token, offline, components, reason)


def _snapshot(repo_id: str, revision: Optional[str], wanted: Sequence[str], token: Optional[str],
              offline: bool, components: Sequence[str], reason: str) -> Path:  # fmt: skip
    """snapshot_download of exactly `wanted` (from the cache only when offline)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=[_glob_escape(f) for f in wanted],
            token=token, local_files_only=offline,
        )  # fmt: skip
    except Exception as e:
        raise _translate(e, repo_id, revision, token, components) from None
    folder = Path(folder)
    absent = [f for f in wanted if not (folder / f).exists()]
    if absent:
        raise SD35Error(_offline_message(repo_id, components, reason) + f" (missing: {', '.join(absent[:5])})")
    return folder


def _glob_escape(name: str) -> str:
    """allow_patterns are fnmatch patterns: make an exact file name match only itself."""
    return re.sub(r"([\[\]*?])", r"[\1]", name)
