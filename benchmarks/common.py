"""Shared pieces of the benchmark scripts (bench_speed.py, bench_memory.py).

- what machine this is, and which versions run (`machine_info`, `machine_title`, `machine_slug`);
- timing (`time_calls`: warm-up runs excluded, median of the timed runs);
- full-size networks at the official configs with random weights (`random_network`): MLX
  initialises lazily, so a network is materialised deliberately, a few hundred MB at a time;
  `--layers N` truncates the depth of every transformer stack for quick smoke runs;
- the denoising step exactly as the pipeline runs it (`make_denoiser`, `denoise_step`), and
  whole runs of steps through the pipeline's loop (`denoise_run`), timed per step
  (`time_per_step`: one synchronisation at the end of each run, as the pipeline waits);
- results: JSON in benchmarks/results/<machine-slug>-<date>.json (one entry per script/model)
  and a markdown section per machine in docs/benchmarks.md (`write_json`, `update_docs`).

Nothing here needs PyTorch; the diffusers baseline lives in bench_speed.py.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import inspect
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import median
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python benchmarks/bench_speed.py` from anywhere
    sys.path.insert(0, str(REPO))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from sd35_mlx.config import (  # noqa: E402
    SD3_MEDIUM_MMDIT,
    SD35_LARGE_MMDIT,
    SD35_MEDIUM_MMDIT,
    CLIPConfig,
    ControlNetConfig,
    MMDiTConfig,
    T5Config,
)  # fmt: skip

GB = 1e9
RESULTS_DIR = REPO / "benchmarks" / "results"
DOCS_PAGE = REPO / "docs" / "benchmarks.md"
CLIP_TOKENS = 77
CFG_SCALE = 4.5  # any value > 1: the step runs the CFG batch of 2

# --model name -> (display name, transformer config)
MODELS: Dict[str, Tuple[str, MMDiTConfig]] = {
    "medium": ("SD3.5 Medium", SD35_MEDIUM_MMDIT),
    "large": ("SD3.5 Large", SD35_LARGE_MMDIT),
    "sd3-medium": ("SD3 Medium", SD3_MEDIUM_MMDIT),
}
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}


# ---- machine and versions ---------------------------------------------------------------------
def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5).stdout.strip()  # fmt: skip
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_hash() -> str:
    """Short hash of the package's sources: identifies the code where git is not available."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted((REPO / "sd35_mlx").rglob("*.py")):
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def _git_commit() -> Optional[str]:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=5)  # fmt: skip
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def mlx_backend() -> str:
    """'cpu', 'cuda' or 'metal': where MLX runs this process's default stream."""
    if mx.default_device().type == mx.cpu:
        return "cpu"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and getattr(cuda, "is_available", lambda: False)():
        return "cuda"
    return "metal" if sys.platform == "darwin" else "gpu"


def add_output_args(parser, docs: Path = DOCS_PAGE) -> None:
    """Where a benchmark writes: its JSON results and (with --write-docs) its part of `docs`."""
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--docs", type=Path, default=docs)
    parser.add_argument("--write-docs", action="store_true", help="update the machine's section of --docs")


def settings_of(args) -> Dict[str, Any]:
    """A benchmark's parsed arguments as its results' JSON records them (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def add_diffusers_args(parser) -> None:
    """The diffusers baselines a benchmark can run beside ours, and their device."""
    parser.add_argument("--torch", action="store_true", help="also run eager diffusers")
    parser.add_argument("--torch-compile", action="store_true", help="also run diffusers under torch.compile (default mode)")
    parser.add_argument("--torch-device", default=None, help="default: cuda if available, else cpu")


def diffusers_label(compiled: bool) -> str:
    return "diffusers + torch.compile" if compiled else "diffusers"


def diffusers_runs(args) -> List[Tuple[bool, str, str]]:
    """(compiled, mode, label) of each diffusers baseline asked for (`add_diffusers_args`):
    eager with --torch, compiled with --torch-compile, in that order."""
    wanted = ((False, args.torch), (True, args.torch_compile))
    return [(compiled, "compiled" if compiled else "eager", diffusers_label(compiled)) for compiled, on in wanted if on]


def strongest_baseline(candidates: Sequence[Any], mode_of: Callable[[Any], Optional[str]]) -> Optional[Any]:
    """The baseline ours is held to: a compiled diffusers run, else an eager one (None: neither)."""
    baselines = [c for c in candidates if mode_of(c) is not None]
    return max(baselines, key=lambda c: mode_of(c) == "compiled", default=None)


def check_bits_and_sizes(parser, args) -> None:
    """--bits among 16 / 8 / 4 and every --size a multiple of 16 (parser.error otherwise)."""
    if any(b not in (4, 8, 16) for b in args.bits):
        parser.error("--bits must be 16, 8 or 4")
    if any(s % 16 for s in args.size):
        parser.error("sizes must be multiples of 16")


def baseline_device(wanted: bool, choice: Optional[str]) -> Optional[str]:
    """The torch device a PyTorch baseline runs on (`choice`, else cuda when torch sees one,
    else cpu); None when no baseline was asked for (torch is then never imported)."""
    if not wanted:
        return None
    import torch

    return choice or ("cuda" if torch.cuda.is_available() else "cpu")


def announce(torch_device: Optional[str], log: Callable[[str], None]) -> Dict[str, Any]:
    """`machine_info`, logged as a benchmark's first lines."""
    info = machine_info(torch_device)
    log(f"machine: {machine_title(info)}\n{versions_line(info)}")
    return info


def machine_info(torch_device: Optional[str] = None) -> Dict[str, Any]:
    """Everything a results page needs to say where and with what a number was measured."""
    info: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "mlx": mx.__version__,
        "mlx_backend": mlx_backend(),
        "sd35_mlx": _version("sd35_mlx") or _package_version(),
        "git": _git_commit(),
        "code_hash": code_hash(),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    if info["mlx_backend"] != "cpu":
        try:
            dev = mx.device_info()
            info["gpu"] = str(dev.get("device_name") or dev.get("architecture") or "GPU")
            mem = dev.get("memory_size") or dev.get("total_memory")
            if mem:
                info["gpu_memory_gb"] = round(int(mem) / GB, 1)
        except Exception:  # device_info differs between backends and versions
            info["gpu"] = "GPU"
        if info["mlx_backend"] == "metal" and info["gpu"].startswith("applegpu"):
            info["gpu"] = f"{info['cpu']} GPU ({info['gpu']})"
    for dist in ("torch", "diffusers", "transformers"):
        v = _version(dist)
        if v:
            info[dist] = v
    if torch_device is not None:
        info["torch_device"] = torch_device
        if torch_device.startswith("cuda"):
            import torch

            info["torch_gpu"] = torch.cuda.get_device_name(0)
            info["torch_cuda"] = torch.version.cuda
    return info


def _package_version() -> str:
    try:
        import sd35_mlx

        return getattr(sd35_mlx, "__version__", "?")
    except ImportError:
        return "?"


def machine_title(info: Dict[str, Any]) -> str:
    """Heading for the machine's section, e.g. 'NVIDIA H100 80GB HBM3 (MLX CUDA), Linux x86_64'."""
    if info["mlx_backend"] == "cpu":
        return f"{info['cpu_cores']}-core {info['platform'].split()[-1]} CPU ({info['cpu']}), {info['platform'].split()[0]}"
    backend = {"cuda": "MLX CUDA", "metal": "MLX Metal"}.get(info["mlx_backend"], "MLX GPU")
    return f"{info['gpu']} ({backend}), {info['platform']}"


def machine_slug(info: Dict[str, Any]) -> str:
    if info["mlx_backend"] == "cpu":
        text = f"cpu-{info['cpu_cores']}core-{info['cpu']}-{info['platform'].split()[0]}"
    else:
        text = f"{info['gpu']}-{info['mlx_backend']}"
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80]


def versions_line(info: Dict[str, Any]) -> str:
    parts = [info["date"], f"mlx {info['mlx']} ({info['mlx_backend']})"]
    for key in ("torch", "diffusers", "transformers"):
        if key in info:
            parts.append(f"{key} {info[key]}")
    if "torch_gpu" in info:
        parts.append(f"torch device {info['torch_gpu']} (CUDA {info.get('torch_cuda')})")
    elif "torch_device" in info:
        parts.append(f"torch device {info['torch_device']}")
    parts.append(f"sd35_mlx {info['sd35_mlx']} (" + (f"git {info['git']}, " if info.get("git") else "")
                 + f"code {info['code_hash']})")
    parts.append(f"host CPU: {info['cpu']}, {info['cpu_cores']} cores; Python {info['python']}")
    return " · ".join(parts)


# ---- timing ---------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds of each timed run (warm-up runs excluded)."""

    runs: List[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return median(self.runs) if self.runs else float("nan")

    @property
    def min(self) -> float:
        return min(self.runs) if self.runs else float("nan")

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": self.min, "runs_s": self.runs}


def time_calls(fn: Callable[[], Any], sync: Callable[[Any], None], warmup: int, repeat: int) -> Timing:
    """Run `fn` warmup + repeat times; `sync(result)` waits for the device (mx.eval, cuda sync)."""
    for _ in range(warmup):
        sync(fn())
    t = Timing()
    for _ in range(repeat):
        start = time.perf_counter()
        sync(fn())
        t.runs.append(time.perf_counter() - start)
    return t


def time_per_step(run: Callable[[], Any], steps: int, sync: Callable[[Any], None], warmup: int, repeat: int) -> Timing:
    """Whole runs of `steps` denoising steps (`run()`: the final latents), synchronised once at
    the end of each run (no wait between steps, as a generation runs); seconds per step of
    each timed run (run time / steps)."""
    t = time_calls(run, sync, warmup, repeat)
    return Timing([r / steps for r in t.runs])


def run_steps(step: Callable[[Any, int], Any], x: Any, steps: int) -> Any:
    """`steps` calls of step(x, i) one after the other, no wait between them (a baseline's loop)."""
    for i in range(steps):
        x = step(x, i)
    return x


def mlx_sync(result: Any) -> None:
    mx.eval(result)


# ---- random full-size networks --------------------------------------------------------------------
def truncated(config, layers: Optional[int]):
    """The config with at most `layers` blocks (None: unchanged). For smoke runs only."""
    if not layers:
        return config
    if isinstance(config, MMDiTConfig):
        depth = min(layers, config.depth)
        return replace(config, depth=depth, dual_attention_layers=tuple(i for i in config.dual_attention_layers if i < depth))
    if isinstance(config, (T5Config, CLIPConfig)):
        return replace(config, num_layers=min(layers, config.num_layers))
    if isinstance(config, ControlNetConfig):
        return replace(config, depth=min(layers, config.depth))
    return config


def materialise(model: nn.Module, chunk_bytes: int = 256 * 2**20) -> int:
    """Evaluate a lazily initialised network a few hundred MB at a time (so the fp32 draws
    behind a bf16 or quantized weight never all exist at once); returns its bytes."""
    pending: List[mx.array] = []
    size = total = 0
    for _, p in tree_flatten(model.parameters()):
        pending.append(p)
        size += p.nbytes
        total += p.nbytes
        if size >= chunk_bytes:
            mx.eval(pending)
            pending, size = [], 0
    mx.eval(pending)
    return total


def build_network(component: str, config, dtype: mx.Dtype, bits: Optional[int] = None) -> nn.Module:
    """A lazily initialised network in `dtype`, quantized to `bits` like the pipeline does
    (quantize.make_spec + quantize_network); nothing is allocated until evaluated."""
    from sd35_mlx.models.clip import CLIPTextEncoder
    from sd35_mlx.models.controlnet import ControlNet
    from sd35_mlx.models.mmdit import MMDiT
    from sd35_mlx.models.t5 import T5Encoder
    from sd35_mlx.models.vae import VAE

    cls = {"transformer": MMDiT, "t5": T5Encoder, "clip_l": CLIPTextEncoder, "clip_g": CLIPTextEncoder, "vae": VAE,
           "controlnet": ControlNet}  # fmt: skip
    model = cls[component](config)
    model.set_dtype(dtype)
    if bits and bits < 16:
        from sd35_mlx.quantize import make_spec, quantize_network

        quantize_network(model, make_spec(component, bits), component)
        if component != "transformer":  # the pipeline does this for quantized encoders; the Denoiser for the transformer
            from sd35_mlx.fast_quantized import use_dequantized_matmul

            use_dequantized_matmul(model)
    return model


def random_network(component: str, config, dtype: mx.Dtype, bits: Optional[int] = None, seed: int = 0) -> nn.Module:
    """`build_network`, materialised: random weights (MLX's default inits), every block its own."""
    mx.random.seed(seed)
    model = build_network(component, config, dtype, bits)
    materialise(model)
    return model


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(model.parameters()))


# ---- our names -> a checkpoint layout's (the mapping table run backwards) -----------------------------
def _inverse_transforms() -> Dict[Callable, Callable]:
    from sd35_mlx.weights.mapping import concat, conv_to_nhwc, identity, swap_halves

    return {
        identity: lambda w, n: [w],
        concat: lambda w, n: mx.split(w, n, axis=0),
        conv_to_nhwc: lambda w, n: [w.transpose(0, 3, 1, 2)],
        swap_halves: lambda w, n: [swap_halves(w)],  # its own inverse
    }


def _target_regex(pattern: str) -> re.Pattern:
    from sd35_mlx.weights.mapping import _PLACEHOLDER

    parts = _PLACEHOLDER.split(pattern)
    return re.compile("".join(f"(?P<{p}>\\d+)" if i % 2 else re.escape(p) for i, p in enumerate(parts)) + r"\Z")


def to_layout(weights: Dict[str, mx.array], layout) -> Dict[str, mx.array]:
    """Our-named weights -> the state dict of `layout` (a `weights.mapping.NetworkLayout`), lazy:
    what a file in that layout holds, for writing random full-size checkpoints."""
    inverse = _inverse_transforms()
    matches = []  # (name, candidate rules with their placeholder values)
    for name in weights:
        found = [(r, m.groupdict()) for r in layout.rules if (m := _target_regex(r.target).match(name))]
        if not found:
            raise ValueError(f"no rule of {layout.name} makes {name}")
        matches.append((name, found))
    # `when` rules (the last block's swapped modulation) look at the source key set: build it
    # first from every candidate's sources (the alternatives share their sources).
    source_keys = frozenset(s.format(**g) for _, found in matches for r, g in found for s in r.sources)
    out: Dict[str, mx.array] = {}
    for name, found in matches:
        rule, groups = next((r, g) for r, g in found if r.when is None or r.when(g, source_keys))
        sources = [layout.prefix + s.format(**groups) for s in rule.sources]
        out.update(zip(sources, inverse[rule.transform](weights[name], len(sources)), strict=True))
    return out


# ---- inputs -------------------------------------------------------------------------------------
def random_conditioning(batch: int, t5_tokens: int, dtype: mx.Dtype, seed: int = 1):
    """A Conditioning (B, 77 + t5_tokens, 4096) / (B, 2048) of random values."""
    from sd35_mlx.conditioning import Conditioning

    k1, k2 = mx.random.split(mx.random.key(seed))
    context = mx.random.normal((batch, CLIP_TOKENS + t5_tokens, 4096), key=k1).astype(dtype)
    pooled = mx.random.normal((batch, 2048), key=k2).astype(dtype)
    mx.eval(context, pooled)
    return Conditioning(context, pooled)


def clip_ids(batch: int, eos: int = 49407, seed: int = 2) -> mx.array:
    """Token ids: BOS, random words, EOS at a random position, EOS padding (CLIP-L style)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = np.full((batch, CLIP_TOKENS), eos, dtype=np.int32)
    ids[:, 0] = 49406
    for b in range(batch):
        n = int(rng.integers(5, CLIP_TOKENS - 2))
        ids[b, 1 : n + 1] = rng.integers(300, 49000, n)
    return mx.array(ids)


def t5_ids(batch: int, tokens: int, vocab: int = 32000, seed: int = 3) -> mx.array:
    import numpy as np

    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(3, vocab, (batch, tokens)).astype(np.int32))


# ---- the denoising step as the pipeline runs it -----------------------------------------------------
def make_denoiser(transformer, positive, negative, *, sigmas: Sequence[float], **options):
    """`sd35_mlx.denoise.Denoiser` with the schedule and CFG as the pipeline builds it.

    Options the installed Denoiser does not take are dropped (and returned), so this keeps
    working while its signature evolves: (denoiser, dropped option names).
    """
    from sd35_mlx.denoise import Denoiser

    accepted = inspect.signature(Denoiser.__init__).parameters
    kwargs = dict(cfg=CFG_SCALE if negative is not None else 1.0, skip_layer_guidance=None,
                  num_steps=len(sigmas) - 1, sigmas=[float(s) for s in sigmas], **options)  # fmt: skip
    used = {k: v for k, v in kwargs.items() if k in accepted}
    return Denoiser(transformer, positive, negative, **used), sorted(set(kwargs) - set(used))


def denoise_step(denoiser, latents: mx.array, i: int, sampler) -> mx.array:
    """One step of the pipeline's loop: model + guidance + sampler update (not evaluated)."""
    if hasattr(denoiser, "step"):
        return denoiser.step(latents, i, sampler)
    v = denoiser(latents, float(sampler.sigmas[i]), i)
    return sampler.step(i, latents, v)


def denoise_run(denoiser, latents: mx.array, sampler, steps: int) -> mx.array:
    """`steps` steps of the pipeline's loop (`Denoiser.run`: the next step's graph built while
    this one runs; every step evaluated); the final latents."""
    if hasattr(denoiser, "run"):
        for _, latents in denoiser.run(latents, sampler, range(steps)):
            pass
        return latents
    for i in range(steps):  # a Denoiser from before `run`: step by step
        latents = denoise_step(denoiser, latents, i, sampler)
        mx.eval(latents)
    return latents


def schedule(steps: int):
    """(sigmas, Euler sampler) of the default SD3 schedule (shift 3.0) for `steps` steps."""
    from sd35_mlx.sampling import flow_sigmas, make_sampler

    sigmas = flow_sigmas(steps, 3.0)
    return sigmas, make_sampler("euler", sigmas)


# ---- results --------------------------------------------------------------------------------------
def write_json(results_dir: Path, info: Dict[str, Any], key: str, payload: Dict[str, Any]) -> Path:
    """Store `payload` under `key` in results_dir/<slug>-<date>.json (other keys kept)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{machine_slug(info)}-{info['date']}.json"
    data: Dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    data.setdefault("machine", {}).update({k: v for k, v in info.items() if k != "command"})
    data.setdefault("runs", {})[key] = {"command": info["command"], "time_utc": info["time_utc"], "info": info, **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(o: Any):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)


DOCS_HEADER = """# Benchmarks

Speed and peak memory of sd35_mlx with full-size networks at the official configurations and
random weights (no download needed), measured by `benchmarks/bench_speed.py` and
`benchmarks/bench_memory.py` (how to run them: [benchmarks/README.md](../benchmarks/README.md)).
Each machine has its own section; a script run with `--write-docs` replaces only its own
table in its machine's section. Raw numbers (every timed run) are in `benchmarks/results/`.

Targets (from the project's issues), on the same GPU as the diffusers baseline:
- speed (issue 12): every bf16 step at ≤ 0.9× diffusers + `torch.compile` (default mode) in
  the same run (`bench_speed.py --torch-compile`; earlier rounds: ≤ 0.75× eager diffusers);
- quantized networks cost memory, not time: a 4-bit or 8-bit transformer step at ≤ 1.1× the
  16-bit step on the same backend, 512² included;
- first image: a fresh CLI process (Medium 1024², 28 steps, warm file cache) ≤ diffusers'
  load + first generation (`bench_first_image.py`);
- kept loaded: over 20 generations the peak stops growing after the second and stays
  ≤ 1.1 × (weights + the largest stage's own need) (`bench_kept_loaded.py`);
- peak memory of a whole 1024² generation (MLX's peak counter) under `--memory-budget` of:
  Medium with 4-bit T5 and 4-bit transformer ≤ 2.5 GB, Medium with T5 dropped ≤ 2.0 GB,
  Large 4-bit ≤ 5 GB, Large 4-bit with one 4-bit SD3.5 Large ControlNet ≤ 7 GB (issue 11; the
  planner's need for it, see `bench_memory.py`), the planner's estimate within ±15 % of the
  measured peak.

A "step" is one denoising step with CFG (batch 2) and T5 at 256 tokens (77 + 256 = 333 text
tokens), run exactly as the pipeline runs it (`Denoiser`), unless a table says otherwise.
"""


def update_docs(path: Path, info: Dict[str, Any], key: str, body: str) -> None:
    """Replace (or add) part `key` in the section of this machine in the results page."""
    path = Path(path)
    text = path.read_text() if path.exists() else DOCS_HEADER
    slug = machine_slug(info)
    m_open, m_close = f"<!-- machine: {slug} -->", f"<!-- /machine: {slug} -->"
    p_open, p_close = f"<!-- part: {key} -->", f"<!-- /part: {key} -->"
    part = f"{p_open}\n{body.strip()}\n{p_close}"
    if m_open not in text:
        text = text.rstrip("\n") + f"\n\n{m_open}\n## {machine_title(info)}\n\n{part}\n{m_close}\n"
    else:
        start = text.index(m_open)
        end = text.index(m_close, start)
        section = text[start:end]
        if p_open in section:
            a = section.index(p_open)
            b = section.index(p_close, a) + len(p_close)
            section = section[:a] + part + section[b:]
        else:
            section = section.rstrip("\n") + f"\n\n{part}\n"
        text = text[:start] + section + text[end:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def publish(args, info: Dict[str, Any], key: str, body: str, payload: Dict[str, Any], log: Callable[[str], None]) -> None:
    """Write the JSON results and, with --write-docs, this script's part of docs/benchmarks.md."""
    path = write_json(args.results_dir, info, key, payload)
    log(f"results: {path}")
    if args.write_docs:
        update_docs(args.docs, info, key, body)
        log(f"docs: {args.docs} (section {machine_slug(info)}, part {key})")
    log(f"wall time {payload['wall_s']:.0f} s")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt_seconds(s: Optional[float]) -> str:
    if s is None or math.isnan(s):
        return "–"
    if s < 1:
        return f"{s * 1000:.1f} ms"
    return f"{s:.2f} s"


def fmt_ratio(r: Optional[float], limit: Optional[float] = None) -> str:
    if r is None or math.isnan(r):
        return "–"
    text = f"{r:.2f}×"
    if limit is not None:
        text += " ✓" if r <= limit else " ✗"
    return text


def fmt_gb(n: Optional[float]) -> str:
    return "–" if n is None else f"{n / GB:.2f} GB"


def set_device(name: str) -> None:
    """--device cpu|gpu|default."""
    if name == "cpu":
        mx.set_default_device(mx.cpu)
    elif name == "gpu":
        mx.set_default_device(mx.gpu)


def truncation_note(layers: Optional[int]) -> str:
    if not layers:
        return ""
    return (f"**Smoke run: every transformer stack truncated to at most {layers} layer(s)** "
            "(MMDiT, T5, CLIP; the VAE is whole): these numbers are not full-model figures.")  # fmt: skip
