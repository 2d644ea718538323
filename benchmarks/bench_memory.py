"""Peak memory per stage of a whole generation, with full-size random networks.

    python benchmarks/bench_memory.py --size 1024 --write-docs                  # the GPU / Mac run
    python benchmarks/bench_memory.py --size 256 --layers 1 --t5-tokens 16 --steps 1   # CPU smoke run

The configurations of the memory targets:
    medium-t5-4bit  SD3.5 Medium, 4-bit T5, 4-bit transformer        target ≤ 2.5 GB
    medium-no-t5    SD3.5 Medium, T5 dropped, 4-bit transformer       target ≤ 2.0 GB
    large-4bit      SD3.5 Large, 4-bit T5, 4-bit transformer          target ≤ 5 GB
    large-4bit-controlnet  large-4bit + one SD3.5 Large ControlNet (canny) at 4-bit   target ≤ 7 GB
(CLIP-L, CLIP-G and the VAE stay 16-bit, as in the pipeline.)

The ControlNet target is what the planner (`plan_memory`, with the ControlNet counted; GPU
estimates) says a 1024² generation needs with CFG as one batch: denoise 6.64 GB (the 4.39 GB of
large-4bit, plus the ControlNet's 1.24 GB of 4-bit weights, 0.80 GB of residuals and control
tokens held with CFG and 0.21 GB for one block's de-quantized weights) + the step's largest
allocation (0.17 GB) + one command buffer (0.1 GB) = 6.91 GB, rounded up to 7.0 GB; the control
image's VAE encode is estimated at 5.97 GB. (CFG as two passes would need 6.16 GB, set by that
control encode estimate: denoise would be 5.57 GB.)
The ControlNet is random, full size (19 image-only blocks, 2.15 B parameters), written in
Stability's single-file layout with the canny type tag and converted to a 4-bit folder by
`sd35_mlx.control.convert.convert_controlnet` (`python -m sd35_mlx.convert --controlnet …
--quantize controlnet=4`).

How: the random networks are first written as a converted sd35_mlx folder
(`sd35_mlx.weights.converted.save_converted`: one network at a time, each built lazily,
quantized, and evaluated + written one shard at a time, so building them needs about one
shard of memory, and that memory is returned before anything is measured). Then each stage
runs once, in the pipeline's order, loading its network lazily from that folder with the
public loader (`sd35_mlx.loading.load_component`) and releasing it afterwards
(`mx.clear_cache()`), as the pipeline's low-memory mode does:

    encode   CLIP-L, CLIP-G, T5 (batch 2: prompt + negative), one network at a time
    control  (ControlNet configurations) the pipeline's own `ControlSession.open` / `.prepare`
             with `SD35Pipeline`'s VAE and ControlNet loaders: a photo canny-preprocessed,
             VAE-encoded as for Stability's canny ControlNets, the ControlNet loaded (lazily);
             then the VAE is released, as `generate_latents` does
    denoise  the pipeline's Denoiser (adaLN precomputed for the whole schedule and freed,
             position table cropped) for --steps steps of a --schedule-steps schedule through
             its `run` loop (the next step queued ahead, as the pipeline), a quantized block's
             layers de-quantized together where the pipeline would under the target's budget
             (`memory.dequantizes_per_block`), with
             the ControlNet's residuals where the configuration has one; the ControlNet is
             released with the transformer (`SD35Pipeline.release("transformer")`)
    decode   VAE decode, whole and tiled

Each stage's peak is MLX's own counter (`mx.reset_peak_memory()` before, `mx.get_peak_memory()`
after); it includes what is resident between stages (conditioning, latents). A configuration's
peak is the largest peak of its stages. The memory planner's estimate (`sd35_mlx.memory`) is
shown beside each measurement: under `--throttle budget` the peak it expects (`expected_peak`:
the memory limit it sets, which queued work fills, plus the largest allocation that can land
past that limit), with the need of each stage beside it.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import mlx.core as mx  # noqa: E402

from sd35_mlx.config import CLIP_G, CLIP_L, SD3_VAE, SD35_LARGE_CONTROLNET, T5_XXL  # noqa: E402

CONFIGS: Dict[str, Dict[str, Any]] = {
    "medium-t5-4bit": dict(model="medium", transformer_bits=4, t5_bits=4, target=2.5e9,
                           title="SD3.5 Medium, T5 4-bit, transformer 4-bit"),
    "medium-no-t5": dict(model="medium", transformer_bits=4, t5_bits=None, target=2.0e9,
                         title="SD3.5 Medium, T5 dropped, transformer 4-bit"),
    "large-4bit": dict(model="large", transformer_bits=4, t5_bits=4, target=5.0e9,
                       title="SD3.5 Large, T5 4-bit, transformer 4-bit"),
    "large-4bit-controlnet": dict(model="large", transformer_bits=4, t5_bits=4, target=7.0e9,
                                  controlnet=dict(bits=4, control_type="canny"),
                                  title="SD3.5 Large, T5 4-bit, transformer 4-bit + ControlNet canny 4-bit"),
}  # fmt: skip


ESTIMATE_TOLERANCE = 0.15  # issue 12: the planner's estimate within ±15 % of the measured peak


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--steps", type=int, default=2, help="denoising steps run (the peak is reached in the first)")
    p.add_argument("--schedule-steps", type=int, default=28, help="length of the schedule the adaLN table is built for")
    p.add_argument("--t5-tokens", type=int, default=256)
    p.add_argument("--layers", type=int, default=None, help="truncate every transformer stack (smoke runs)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(C.DTYPES))
    p.add_argument("--device", default="default", choices=["default", "cpu", "gpu"])
    p.add_argument("--tile", default="auto", choices=["auto", "on", "off"],
                   help="decode of a configuration: auto = tiled when the untiled decode would not fit its target")
    p.add_argument("--throttle", default="budget", choices=["budget", "off", "floor"],
                   help="budget (the pipeline under --memory-budget): MLX's memory limit set just below the "
                        "configuration's target; off: MLX's default limit; floor: 1 byte (each stage's own need)")
    p.add_argument("--workdir", type=Path, default=None, help="where the converted random weights go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the converted weights afterwards")
    C.add_output_args(p)
    args = p.parse_args(argv)
    if args.size % 16:
        p.error("--size must be a multiple of 16")
    if not 1 <= args.steps <= args.schedule_steps:
        p.error("--steps must be between 1 and --schedule-steps")
    return args


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Stage:
    name: str
    peak: int
    resident_before: int  # MLX memory in use when the stage started (conditioning, latents)
    weights: Optional[int]  # bytes of the network's parameters (as loaded)
    seconds: float
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(name=self.name, peak_bytes=self.peak, resident_before_bytes=self.resident_before,
                    weight_bytes=self.weights, seconds=self.seconds, **self.extra)  # fmt: skip


def release() -> None:
    gc.collect()
    mx.clear_cache()


def measure(name: str, run: Callable[[Dict[str, Any]], Any], limit: Optional[int] = None) -> tuple:
    """Run one stage from a clean cache under MLX memory limit `limit` (None: MLX's default);
    `run(notes)` may record e.g. notes['weights']."""
    from sd35_mlx.memory import memory_limit

    release()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    notes: Dict[str, Any] = {"memory_limit_bytes": limit}
    start = time.perf_counter()
    with memory_limit(limit):
        out = run(notes)
    seconds = time.perf_counter() - start
    peak = max(mx.get_peak_memory(), before)
    release()
    stage = Stage(name, peak, before, notes.pop("weights", None), seconds, notes)
    log(f"  {name:<22} peak {C.fmt_gb(peak)}  (weights {C.fmt_gb(stage.weights)}, "
        f"resident before {C.fmt_gb(before)}, {seconds:.1f} s)")  # fmt: skip
    return stage, out


# ---- the random converted folders ---------------------------------------------------------------------
def write_random_folder(folder: Path, networks: Dict[str, tuple], dtype, seed: int = 0) -> float:
    """save_converted of lazily built random networks {component: (config, bits)}; seconds."""
    from sd35_mlx.quantize import make_spec
    from sd35_mlx.weights.converted import save_converted

    def loader(component, config):
        def build():
            mx.random.seed(seed + len(component))
            return C.build_network(component, config, dtype)  # quantized by save_converted

        return build

    quant = {c: make_spec(c, bits) for c, (_, bits) in networks.items() if bits and bits < 16}
    start = time.perf_counter()
    save_converted(folder, {c: loader(c, cfg) for c, (cfg, _) in networks.items()}, quantization=quant,
                   dtype=str(dtype).replace("mlx.core.", ""), max_shard_bytes=512 * 2**20,
                   force=True)  # fmt: skip
    release()
    return time.perf_counter() - start


def write_random_controlnet(folder: Path, config, bits: Optional[int], control_type: str, dtype, seed: int = 7) -> float:
    """A random ControlNet written as Stability's single file (our names run backwards through
    the layout table, plus the `control_type` tag), then converted by the converter itself
    (`convert_controlnet`, as `python -m sd35_mlx.convert --controlnet FILE --quantize
    controlnet=BITS`); the single file is removed afterwards. Seconds."""
    from mlx.utils import tree_flatten

    from sd35_mlx.control.convert import convert_controlnet
    from sd35_mlx.control.spec import STABILITY_TYPE_IDS
    from sd35_mlx.weights.tables.controlnet import CONTROL_TYPE_KEY, STABILITY

    start = time.perf_counter()
    tag = {name: i for i, name in STABILITY_TYPE_IDS.items()}[control_type]
    single = folder.parent / f"sd3.5_random_controlnet_{control_type}.safetensors"
    net = C.random_network("controlnet", config, dtype, seed=seed)  # materialised in chunks
    tensors = C.to_layout(dict(tree_flatten(net.parameters())), STABILITY)
    tensors[CONTROL_TYPE_KEY] = mx.array([tag], dtype=mx.int32)
    mx.save_safetensors(str(single), tensors)
    del net, tensors
    release()
    quantize = f"controlnet={bits}" if bits and bits < 16 else None
    convert_controlnet(single, folder, dtype=str(dtype).replace("mlx.core.", ""), quantize=quantize, force=True,
                       max_shard_bytes=512 * 2**20)  # fmt: skip
    single.unlink()
    release()
    return time.perf_counter() - start


def write_control_photo(path: Path, size: int) -> Path:
    """A picture with clear edges (discs and bars on a gradient) for the canny preprocessor."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([x, y, 1 - x], axis=-1) * 120
    img[(x - 0.4) ** 2 + (y - 0.45) ** 2 < 0.06] = (230, 200, 40)
    img[(x - 0.75) ** 2 + (y - 0.3) ** 2 < 0.01] = (250, 250, 250)
    img[(y > 0.7) & (y < 0.8) & (x > 0.1)] = (20, 90, 200)
    Image.fromarray(img.astype(np.uint8)).save(path)
    return path


class ControlHost:
    """What `ControlSession` uses of an `SD35Pipeline`, over this benchmark's folders: the
    pipeline's own VAE and ControlNet loaders and its release, with MLX held to the
    configuration's memory limit as `SD35Pipeline._within_budget` does under a budget, and the
    plan's VAE encode tiles (`SD35Pipeline.encode_tile`)."""

    def __init__(self, vae_folder: Path, transformer_config, dtype, limit: Optional[int],
                 encode_tile: Optional[int] = None):  # fmt: skip
        from sd35_mlx.variants import detect_variant
        from sd35_mlx.weights.sources import resolve_sources

        self.sources = resolve_sources(vae_folder, ("vae",))
        self.transformer_config = transformer_config
        self.variant = detect_variant(transformer_config)
        self.dtype, self.limit, self.encode_tile = dtype, limit, encode_tile
        self.controlnet_quantization = None  # a converted ControlNet loads as stored
        self._vae, self._transformer, self._controlnets = None, None, {}

    def _within_budget(self):
        from sd35_mlx.memory import memory_limit

        return memory_limit(self.limit)

    def _load_vae(self):
        from sd35_mlx.pipeline import SD35Pipeline

        return SD35Pipeline._load_vae(self)

    def _load_controlnet(self, spec):
        from sd35_mlx.pipeline import SD35Pipeline

        return SD35Pipeline._load_controlnet(self, spec)

    def release(self, *names: str) -> None:
        from sd35_mlx.pipeline import SD35Pipeline

        SD35Pipeline.release(self, *names)


def control_settings(config: Dict[str, Any], photo: Path, size: int):
    """The generation settings ControlSession reads: one ControlNet, the photo canny-preprocessed."""
    from sd35_mlx.control.settings import ControlNetSettings
    from sd35_mlx.settings import GenerationSettings

    cn = ControlNetSettings(str(config["controlnet_folder"]), image=str(photo), preprocess="canny").validate()
    return GenerationSettings(width=size, height=size, controlnets=(cn,))


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ---- the stages ------------------------------------------------------------------------------------------
def run_stages(args, work: Path, dtype) -> Dict[str, Any]:
    """Write the random folders, then measure the stages once per memory limit: under
    `--throttle budget` each configuration runs with the limit its own target gives."""
    configs = {k: dict(CONFIGS[k]) for k in args.configs}
    models = sorted({c["model"] for c in configs.values()})
    t5_bits = sorted({c["t5_bits"] for c in configs.values() if c["t5_bits"] is not None})
    out: Dict[str, Any] = {"build_s": {}, "stages": {}, "limits": {}}

    encoders: Dict[str, tuple] = {
        "clip_l": (C.truncated(CLIP_L, args.layers), None),
        "clip_g": (C.truncated(CLIP_G, args.layers), None),
        "vae": (SD3_VAE, None),
    }
    enc_folders = {}
    for bits in t5_bits or [None]:
        nets = dict(encoders)
        if bits is not None:
            nets["t5"] = (C.truncated(T5_XXL, args.layers), bits)
        folder = work / f"encoders-t5-{bits or 'none'}"
        log(f"writing random {', '.join(nets)} to {folder} …")
        out["build_s"][folder.name] = write_random_folder(folder, nets, dtype)
        enc_folders[bits] = folder
        encoders = {}  # CLIPs and VAE once; later folders only hold another T5
    tr_folders = {}
    for key in models:
        bits_set = sorted({c["transformer_bits"] for c in configs.values() if c["model"] == key})
        for bits in bits_set:
            folder = work / f"transformer-{key}-{bits}"
            log(f"writing random {C.MODELS[key][0]} transformer ({bits}-bit) to {folder} …")
            cfg = C.truncated(C.MODELS[key][1], args.layers)
            out["build_s"][folder.name] = write_random_folder(folder, {"transformer": (cfg, bits)}, dtype)
            tr_folders[(key, bits)] = folder
    for key, cfg in configs.items():
        if cfg.get("controlnet"):
            cn = cfg["controlnet"]
            folder = work / f"controlnet-{cn['control_type']}-{cn['bits']}"
            if not folder.is_dir():
                log(f"writing a random SD3.5 Large ControlNet ({cn['control_type']}, {cn['bits']}-bit) to {folder} …")
                cn_config = C.truncated(SD35_LARGE_CONTROLNET, args.layers)
                out["build_s"][folder.name] = write_random_controlnet(folder, cn_config, cn["bits"], cn["control_type"], dtype)
            cfg["controlnet_folder"] = folder
    photo = write_control_photo(work / "control.png", args.size)
    out["folder_bytes"] = {p.name: folder_bytes(p) for p in work.iterdir() if p.is_dir()}
    log(f"built in {sum(out['build_s'].values()):.0f} s; measuring")

    out["choices"] = {key: pipeline_choice(args, cfg) for key, cfg in configs.items()}  # planned once
    groups: Dict[Optional[int], List[str]] = {}
    for key, cfg in configs.items():
        groups.setdefault(memory_limit_for(args, cfg, out["choices"][key]), []).append(key)
    for limit, keys in groups.items():
        label = "default" if limit is None else f"{limit / C.GB:.2f} GB"
        log(f"memory limit {label}: {', '.join(keys)}")
        group = [(configs[k], out["choices"][k]) for k in keys]
        stages = measure_stages(args, dtype, group, enc_folders, tr_folders, limit, photo)
        out["stages"][label] = stages
        out["limits"].update({k: label for k in keys})
    return out


def memory_limit_for(args, config: Dict[str, Any], choice: Dict[str, Any]) -> Optional[int]:
    """MLX's memory limit while a configuration runs: as the pipeline under a budget of its target
    (`budget`), MLX's default (`off`), or 1 byte (`floor`: every queued buffer is waited for,
    so the peak is what the stage itself needs)."""
    from sd35_mlx.memory import budget_limit

    if args.throttle == "budget":
        return budget_limit(int(config["target"]), choice["plan"])
    return {"off": None, "floor": 1}[args.throttle]


def measure_stages(args, dtype, group, enc_folders, tr_folders, limit: Optional[int], photo: Path) -> Dict[str, Stage]:
    """The stages of the configurations in `group` ((config, pipeline_choice) pairs) under `limit`."""
    from sd35_mlx.conditioning import assemble
    from sd35_mlx.control.prepare import ControlSession
    from sd35_mlx.loading import load_component
    from sd35_mlx.models.vae_tiling import DEFAULT_DECODE_TILE, decode_tiled

    stages: Dict[str, Stage] = {}
    first = next(iter(enc_folders.values()))
    # -- encode: one encoder at a time, prompt + negative as one batch of 2
    ids = C.clip_ids(2)
    hidden = {}
    for name in ("clip_l", "clip_g"):
        def run(notes, name=name):
            model = load_component(first, name, dtype)
            notes["weights"] = C.parameter_bytes(model)
            result = model(ids)
            mx.eval(result.hidden, result.pooled)
            return result

        stages[name], hidden[name] = measure(name, run, limit)
    t5_out = {}
    for bits in sorted({c["t5_bits"] for c, _ in group if c["t5_bits"] is not None}):
        folder = enc_folders[bits]

        def run(notes, folder=folder):
            model = load_component(folder, "t5", dtype)
            notes["weights"] = C.parameter_bytes(model)
            result = model(C.t5_ids(2, args.t5_tokens))
            mx.eval(result)
            return result

        stages[f"t5-{bits}bit"], t5_out[bits] = measure(f"t5-{bits}bit", run, limit)
        try:  # the pipeline's stream_t5 mode: one block's weights in memory at a time
            from sd35_mlx.streaming import streamed_t5
        except ImportError:
            continue

        def run_streamed(notes, folder=folder):
            model = streamed_t5(folder, dtype=dtype)
            result = model(C.t5_ids(2, args.t5_tokens))
            mx.eval(result)
            return result

        stages[f"t5-{bits}bit-streamed"], _ = measure(f"t5-{bits}bit-streamed", run_streamed, limit)
    t5_hidden = next(iter(t5_out.values()), None)
    cond = assemble(hidden["clip_l"], hidden["clip_g"], t5_hidden, args.t5_tokens)
    mx.eval(cond.context, cond.pooled)
    del hidden, t5_out, t5_hidden
    negative, positive = cond[0], cond[1]  # T5-dropped has the same shapes (zeros stand in)

    noise = mx.random.normal((1, args.size // 8, args.size // 8, 16), key=mx.random.key(0))
    # -- control (ControlNet configurations): what generate_latents runs between encode and denoise
    controls: Dict[Path, tuple] = {}  # ControlNet folder -> (host, ActiveControlNets)
    for c, choice in group:
        if not c.get("controlnet") or c["controlnet_folder"] in controls:
            continue
        host = ControlHost(first, C.truncated(C.MODELS[c["model"]][1], args.layers), dtype, limit,
                           choice["plan"].encode_tile)  # fmt: skip

        def run(notes, host=host, settings=control_settings(c, photo, args.size)):
            session = ControlSession.open(host, settings)  # recognised from the folder, base checked
            nets, _ = session.prepare(host, settings, noise, None)  # control latents encoded, nets loaded
            notes["weights"] = C.parameter_bytes(host._vae.encoder)  # what the encode reads
            notes["control_type"] = session.specs[0][1].control_type
            host.release("vae")  # as generate_latents does before denoising
            return nets

        name = control_stage_name(c["controlnet"])
        stages[name], nets = measure(name, run, limit)
        controls[c["controlnet_folder"]] = (host, nets)
        del nets

    # -- denoise
    sigmas, sampler = C.schedule(args.schedule_steps)
    latents = {}
    # one run per (model, bits, CFG passes, ControlNet); its first configuration sets the budget
    runs: Dict[tuple, tuple] = {}
    for c, choice in group:
        runs.setdefault((c["model"], c["transformer_bits"], choice["split_cfg"], c.get("controlnet_folder")), (c, choice))
    for (key, bits, split, cn_folder), (config, choice) in sorted(runs.items(), key=lambda kv: str(kv[0])):
        cn = config.get("controlnet") if cn_folder else None

        def run(notes, folder=tr_folders[(key, bits)], positive=positive, negative=negative, split=split,
                cn_folder=cn_folder, config=config, choice=choice):  # fmt: skip
            from sd35_mlx.memory import dequantizes_per_block

            model = load_component(folder, "transformer", dtype)
            host, nets = controls.pop(cn_folder) if cn_folder else (None, [])
            notes["weights"] = C.parameter_bytes(model)
            # as the pipeline under the target's budget (SD35Pipeline._dequantizes_per_block)
            budget = int(config["target"]) if args.throttle == "budget" else None
            per_block = dequantizes_per_block(budget, choice["plan"], model.block_dense_bytes())
            notes["dequantize_per_block"] = per_block
            den, ignored = C.make_denoiser(model, positive, negative, sigmas=sigmas,
                                           free_adaln=True, free_pos_embed=True,  # as the pipeline (low memory)
                                           split_cfg=split,  # as the pipeline's plan for the target
                                           dequantize_per_block=per_block,
                                           controlnets=nets)  # fmt: skip
            if ignored:
                notes["denoiser_options_ignored"] = ignored
            # the pipeline's loop (`Denoiser.run`: the next step built and queued while one runs)
            x, notes["step_s"], t0 = noise, [], time.perf_counter()
            for _, x in den.run(noise, sampler, range(args.steps)):
                notes["step_s"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
            # what stays after freeing adaLN / the full table, and the ControlNets (materialised by the Denoiser)
            notes["weights"] = C.parameter_bytes(model) + sum(C.parameter_bytes(n.net) for n in nets)
            if host is not None:
                host.release("transformer")  # the ControlNets go with the transformer
            return x

        name = denoise_stage_name(key, bits, split, cn)
        stages[name], latents[key] = measure(name, run, limit)
    del cond, positive, negative

    # -- decode (the decode stage is the same for every model: one latent shape)
    z_latents = next(iter(latents.values()))
    del latents
    one_tile = args.size // 8 <= DEFAULT_DECODE_TILE  # decode_tiled is then the plain decode
    for tiled, tile in ((False, None),) if one_tile else ((False, None), (True, DEFAULT_DECODE_TILE), (True, 32)):
        def run(notes, tiled=tiled, tile=tile):
            vae = load_component(first, "vae", dtype)
            z = vae.from_latents(z_latents).astype(dtype)
            images = decode_tiled(vae, z, tile=tile) if tiled else vae.decode(z)
            mx.eval(images)
            notes["weights"] = C.parameter_bytes(vae.decoder)  # what a decode reads
            return None

        name = decode_stage_name(tile)
        stages[name], _ = measure(name, run, limit)
    if one_tile:
        for tile in (DEFAULT_DECODE_TILE, 32):
            stages[decode_stage_name(tile)] = stages["decode"]
    return stages


def denoise_stage_name(model: str, bits: int, split_cfg: bool, controlnet: Optional[Dict[str, Any]] = None) -> str:
    cn = f"-controlnet-{controlnet['control_type']}-{controlnet['bits']}bit" if controlnet else ""
    return f"denoise-{model}-{bits}bit{cn}" + ("-split-cfg" if split_cfg else "")


def control_stage_name(controlnet: Dict[str, Any]) -> str:
    return f"control-{controlnet['control_type']}"


def decode_stage_name(tile: Optional[int]) -> str:
    from sd35_mlx.models.vae_tiling import DEFAULT_DECODE_TILE

    return "decode" if tile is None else "decode-tiled" if tile == DEFAULT_DECODE_TILE else f"decode-tiled-{tile * 8}px"


# ---- configurations ------------------------------------------------------------------------------------
def estimator(args, config: Dict[str, Any]):
    from sd35_mlx.memory import MemoryEstimator

    controlnets = []
    if config.get("controlnet_folder"):  # as SD35Pipeline._estimator plans the ControlNets it is told about
        from sd35_mlx.control.spec import open_controlnet

        spec = open_controlnet(config["controlnet_folder"])
        controlnets.append((spec.config, spec.quantization(None)))  # a converted one: as stored
    return MemoryEstimator(
        C.truncated(C.MODELS[config["model"]][1], args.layers), t5=C.truncated(T5_XXL, args.layers),
        vae=SD3_VAE, clip_l=C.truncated(CLIP_L, args.layers), clip_g=C.truncated(CLIP_G, args.layers),
        trimmed_transformer=True, split_cfg=True,  # as the pipeline: CFG in two passes when one does not fit
        controlnets=controlnets,
    )  # fmt: skip


def pipeline_choice(args, config: Dict[str, Any]) -> Dict[str, Any]:
    """What the pipeline runs for this configuration under a memory budget of its target:
    the planner's T5 mode (loaded / streamed / dropped) and VAE tiling, with the bits fixed.
    When nothing fits by the planner's estimate, its smallest settings (T5 streamed, VAE
    tiled) are measured and the planner's message is reported."""
    from sd35_mlx.models.vae_tiling import should_tile

    from sd35_mlx.memory import DECODE_TILES, expected_peak, plan_memory, throttle_bytes
    from sd35_mlx.quantize import make_spec

    bits, t5_bits = config["transformer_bits"], config["t5_bits"]
    tr_spec = make_spec("transformer", bits) if bits else None
    t5_spec = make_spec("t5", t5_bits) if t5_bits else None
    choice: Dict[str, Any] = {"t5_mode": "dropped" if t5_bits is None else "loaded",
                              "tiled": should_tile(args.size, args.size, int(config["target"])), "tile": None}  # fmt: skip
    est = estimator(args, config)
    tilings = ((False, None),) + tuple((True, t) for t in DECODE_TILES)
    try:
        if t5_bits is None:  # T5 dropped is the configuration itself, not the planner's choice
            plans = [est.plan(tr_spec, None, "dropped", tiled, args.size, args.size, args.t5_tokens, tile, split)
                     for split in (False, True) for tiled, tile in tilings]  # fmt: skip
            plan = next((p for p in plans if p.peak <= throttle_bytes(int(config["target"]), p.headroom)), None)
            if plan is None:
                raise ValueError(f"nothing fits a {config['target'] / C.GB:.2f} GB budget (smallest plan "
                                 f"{min(p.peak for p in plans) / C.GB:.2f} GB)")  # fmt: skip
        else:
            plan = plan_memory(est, int(config["target"]), args.size, args.size, t5_tokens=args.t5_tokens,
                               allow_drop_t5=False, fixed={"transformer": tr_spec, "t5": t5_spec})  # fmt: skip
    except Exception as e:  # nothing fits by the estimate: say so, measure the smallest settings anyway
        choice["planner_note"] = f"planner: {str(e).split(', most of it')[0]}"
        plan = est.plan(tr_spec, t5_spec, "dropped" if t5_bits is None else "streamed", True, args.size, args.size,
                        args.t5_tokens, DECODE_TILES[-1])  # fmt: skip
    planner = {"stages": dict(plan.stages), "peak": plan.peak}
    if args.throttle == "budget":  # what the planner expects the peak under the budget to be
        planner["expected_peak"] = expected_peak(int(config["target"]), plan)
    choice.update(t5_mode=str(plan.t5), tiled=plan.tile_vae, tile=plan.decode_tile, split_cfg=plan.split_cfg,
                  headroom=plan.headroom, dense_block=plan.dense_block, planner=planner, plan=plan)  # fmt: skip
    if args.tile != "auto":
        choice["tiled"] = args.tile == "on"
        choice["tile"] = choice["tile"] or DECODE_TILES[0] if choice["tiled"] else None
    return choice


def summarise(args, out: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for key in args.configs:
        cfg = CONFIGS[key]
        stages = out["stages"][out["limits"][key]]
        choice = out["choices"][key]
        cn = cfg.get("controlnet")
        encode = ["clip_l", "clip_g"]
        if choice["t5_mode"] != "dropped":
            name = f"t5-{cfg['t5_bits']}bit" + ("-streamed" if choice["t5_mode"] == "streamed" else "")
            if name not in stages:  # no streaming available: the loaded T5 is what runs
                name, choice["t5_mode"] = f"t5-{cfg['t5_bits']}bit", "loaded"
            encode.append(name)
        parts = {"encode": max(stages[s].peak for s in encode)}
        if cn:
            parts["control"] = stages[control_stage_name(cn)].peak
        parts["denoise"] = stages[denoise_stage_name(cfg["model"], cfg["transformer_bits"], choice["split_cfg"], cn)].peak
        parts["decode"] = stages[decode_stage_name(choice["tile"] if choice["tiled"] else None)].peak
        peak = max(parts.values())
        full_size = not args.layers and args.size == 1024
        rows.append(dict(config=key, title=cfg["title"], t5_mode=choice["t5_mode"], split_cfg=choice["split_cfg"],
                         memory_limit=out["limits"][key],
                         tiled_decode=choice["tiled"], decode_tile_px=choice["tile"] and choice["tile"] * 8,
                         stage_peaks=parts, peak=peak, target=cfg["target"] if full_size else None,
                         planner=choice.get("planner", {}), planner_note=choice.get("planner_note")))  # fmt: skip
    return rows


def report(args, info, out, rows) -> str:
    lines = [f"### Peak memory: whole generation at {args.size}²"]
    if args.layers:
        lines.append(C.truncation_note(args.layers))
    lines.append(f"_{C.versions_line(info)}_  \n_command: `{info['command']}`_")
    lines.append(
        f"Settings: {args.dtype}; CFG batch 2; T5 {args.t5_tokens} tokens; {args.steps} denoising step(s) of a "
        f"{args.schedule_steps}-step schedule; networks loaded lazily from a converted folder and released "
        "after their stage. GB = 10⁹ bytes; peaks are MLX's counter and include what is resident between "
        "stages (conditioning, latents). "
        + {"budget": "Each configuration runs as the pipeline does under `--memory-budget` of its target: MLX's memory "
                     "limit is `sd35_mlx.memory.throttle_bytes(target, plan.headroom)`, so evaluation waits for queued GPU work "
                     "whenever active memory passes it.",
           "off": "MLX's default memory limit (`--throttle off`): no waiting for queued GPU work.",
           "floor": "MLX's memory limit is 1 byte (`--throttle floor`): evaluation waits for all queued work at every "
                    "buffer, so each peak is what the stage itself needs."}[args.throttle]
    )  # fmt: skip
    headers = ["configuration", "T5", "CFG", "VAE decode", "encode peak", "control peak", "denoise peak", "decode peak",
               "**generation peak**", "planner estimate", "estimate / peak", "target"]  # fmt: skip
    table = []
    for r in rows:
        plan = r["planner"]
        estimate = plan.get("expected_peak", plan.get("peak"))
        est = C.fmt_gb(estimate) if estimate is not None else "n/a"
        if "stages" in plan:  # the need of encode / [control /] denoise / decode, in the order they run
            est += " (need " + " / ".join(C.fmt_gb(v).replace(" GB", "") for v in plan["stages"].values()) + ")"
        error = estimate / r["peak"] - 1 if estimate is not None else None
        ratio = "–" if error is None else f"{error:+.0%} " + ("✓" if abs(error) <= ESTIMATE_TOLERANCE else "✗")
        target = "–"
        if r["target"]:
            target = f"≤ {r['target'] / C.GB:.1f} GB " + ("✓" if r["peak"] <= r["target"] else "✗")
        p = r["stage_peaks"]
        decode = f"{r['decode_tile_px']}-px tiles" if r["tiled_decode"] else "whole"
        table.append([r["title"], r["t5_mode"], "two passes" if r["split_cfg"] else "one batch", decode, C.fmt_gb(p["encode"]),
                      C.fmt_gb(p.get("control")), C.fmt_gb(p["denoise"]), C.fmt_gb(p["decode"]), f"**{C.fmt_gb(r['peak'])}**",
                      est, ratio, target])  # fmt: skip
    lines.append(C.markdown_table(headers, table))
    lines.append(
        "T5 mode, CFG passes and VAE tiling are what the pipeline's memory planner (`sd35_mlx.memory.plan_memory`) "
        "chooses for a budget of the target with these bits; planner estimate: "
        + ("the peak it expects under the budget (`sd35_mlx.memory.expected_peak`: the stage's memory limit, which "
           "work queued ahead fills, plus the largest allocation that can land past it), then "
           if args.throttle == "budget" else "")
        + "its estimated need of each "
        "stage (encode / denoise / decode, GB, with a ControlNet encode / control / denoise / decode: control is the "
        "control image's VAE encode, which the pipeline runs between the text encoders and the transformer; a plan "
        "fits when its largest need is within the memory limit, and queued GPU work fills the rest of the budget); "
        "estimate / peak: the planner's estimate against the measured generation peak (issue 12: within ±15 %)."
        + "".join(f" {r['title']}: {r['planner_note']}." for r in rows if r.get("planner_note"))
    )
    stage_rows = []
    stages = [s for group in out["stages"].values() for s in {id(s): s for s in group.values()}.values()]
    for s in stages:  # decode-tiled may be decode itself
        over = s.peak - (s.weights or 0) - s.resident_before
        steps = s.extra.get("step_s") or []
        step = f"{1000 * min(steps[1:] or steps):.0f} ms" if steps else "–"  # the first step compiles
        stage_rows.append([s.name, C.fmt_gb(s.weights), C.fmt_gb(s.resident_before), C.fmt_gb(s.peak),
                           C.fmt_gb(over), C.fmt_gb(s.extra.get("memory_limit_bytes")), f"{s.seconds:.1f} s", step])  # fmt: skip
    lines.append("**Per stage** (each measured once; weights = the network's parameters in use (the "
                 "transformer's after the Denoiser freed its adaLN weights and full position table); "
                 "above = peak − weights − resident before: activations and temporaries)\n\n"
                 + C.markdown_table(["stage", "weights", "resident before", "peak", "above", "memory limit", "time",
                                   "step"], stage_rows))  # fmt: skip
    return "\n\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.throttle == "budget" and sys.platform.startswith("linux"):
        from sd35_mlx.memory import use_small_command_buffers

        use_small_command_buffers()  # as the CLI runs under --memory-budget
    C.set_device(args.device)
    dtype = C.DTYPES[args.dtype]
    info = C.machine_info()
    log(f"machine: {C.machine_title(info)}\n{C.versions_line(info)}")
    if args.layers:
        log(C.truncation_note(args.layers).replace("**", ""))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sd35-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        out = run_stages(args, work, dtype)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = summarise(args, out)
    body = report(args, info, out, rows)
    print("\n" + body + "\n")
    payload = {
        "settings": C.settings_of(args),
        "configs": rows,
        "stages": {g: {k: v.to_dict() for k, v in group.items()} for g, group in out["stages"].items()},
        "limits": out["limits"],
        "build_s": out["build_s"],
        "folder_bytes": out["folder_bytes"],
        "wall_s": time.perf_counter() - start,
    }
    key = f"memory-{args.size}" + (f"-layers{args.layers}" if args.layers else "") + ("" if args.throttle == "budget" else f"-throttle-{args.throttle}")
    if args.configs not in (list(CONFIGS), list(CONFIGS)[:3]):  # beyond issue 12's three: its own part
        key += "-" + "-".join(args.configs)
    C.publish(args, info, key, body, payload, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
