"""Peak memory per stage of a whole generation, with full-size random networks.

    python benchmarks/bench_memory.py --size 1024 --write-docs                  # the GPU / Mac run
    python benchmarks/bench_memory.py --size 256 --layers 1 --t5-tokens 16 --steps 1   # CPU smoke run

The configurations of the memory targets:
    medium-t5-4bit  SD3.5 Medium, 4-bit T5, 4-bit transformer        target ≤ 2.5 GB
    medium-no-t5    SD3.5 Medium, T5 dropped, 4-bit transformer       target ≤ 2.0 GB
    large-4bit      SD3.5 Large, 4-bit T5, 4-bit transformer          target ≤ 5 GB
(CLIP-L, CLIP-G and the VAE stay 16-bit, as in the pipeline.)

How: the random networks are first written as a converted sd35_mlx folder
(`sd35_mlx.weights.converted.save_converted`: one network at a time, each built lazily,
quantized, and evaluated + written one shard at a time, so building them needs about one
shard of memory, and that memory is returned before anything is measured). Then each stage
runs once, in the pipeline's order, loading its network lazily from that folder with the
public loader (`sd35_mlx.loading.load_component`) and releasing it afterwards
(`mx.clear_cache()`), as the pipeline's low-memory mode does:

    encode   CLIP-L, CLIP-G, T5 (batch 2: prompt + negative), one network at a time
    denoise  the pipeline's Denoiser (adaLN precomputed for the whole schedule and freed,
             position table cropped) for --steps steps of a --schedule-steps schedule
    decode   VAE decode, whole and tiled

Each stage's peak is MLX's own counter (`mx.reset_peak_memory()` before, `mx.get_peak_memory()`
after); it includes what is resident between stages (conditioning, latents). A configuration's
peak is the largest peak of its stages. The memory planner's estimate (`sd35_mlx.memory`) is
shown beside each measurement.
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

from sd35_mlx.config import CLIP_G, CLIP_L, SD3_VAE, T5_XXL  # noqa: E402

CONFIGS: Dict[str, Dict[str, Any]] = {
    "medium-t5-4bit": dict(model="medium", transformer_bits=4, t5_bits=4, target=2.5e9,
                           title="SD3.5 Medium, T5 4-bit, transformer 4-bit"),
    "medium-no-t5": dict(model="medium", transformer_bits=4, t5_bits=None, target=2.0e9,
                         title="SD3.5 Medium, T5 dropped, transformer 4-bit"),
    "large-4bit": dict(model="large", transformer_bits=4, t5_bits=4, target=5.0e9,
                       title="SD3.5 Large, T5 4-bit, transformer 4-bit"),
}  # fmt: skip


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
    p.add_argument("--results-dir", type=Path, default=C.RESULTS_DIR)
    p.add_argument("--docs", type=Path, default=C.DOCS_PAGE)
    p.add_argument("--write-docs", action="store_true")
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


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ---- the stages ------------------------------------------------------------------------------------------
def run_stages(args, work: Path, dtype) -> Dict[str, Any]:
    """Write the random folders, then measure the stages once per memory limit: under
    `--throttle budget` each configuration runs with the limit its own target gives."""
    configs = {k: CONFIGS[k] for k in args.configs}
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
        stages = measure_stages(args, dtype, group, enc_folders, tr_folders, limit)
        out["stages"][label] = stages
        out["limits"].update({k: label for k in keys})
    return out


def memory_limit_for(args, config: Dict[str, Any], choice: Dict[str, Any]) -> Optional[int]:
    """MLX's memory limit while a configuration runs: as the pipeline under a budget of its target
    (`budget`), MLX's default (`off`), or 1 byte (`floor`: every queued buffer is waited for,
    so the peak is what the stage itself needs)."""
    from sd35_mlx.memory import throttle_bytes

    if args.throttle == "budget":
        return throttle_bytes(int(config["target"]), choice["headroom"])
    return {"off": None, "floor": 1}[args.throttle]


def measure_stages(args, dtype, group, enc_folders, tr_folders, limit: Optional[int]) -> Dict[str, Stage]:
    """The stages of the configurations in `group` ((config, pipeline_choice) pairs) under `limit`."""
    from sd35_mlx.conditioning import assemble
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

    # -- denoise
    sigmas, sampler = C.schedule(args.schedule_steps)
    noise = mx.random.normal((1, args.size // 8, args.size // 8, 16), key=mx.random.key(0))
    latents = {}
    runs = {(c["model"], c["transformer_bits"], choice["split_cfg"]) for c, choice in group}
    for key, bits, split in sorted(runs):
        def run(notes, folder=tr_folders[(key, bits)], positive=positive, negative=negative, split=split):
            model = load_component(folder, "transformer", dtype)
            notes["weights"] = C.parameter_bytes(model)
            den, ignored = C.make_denoiser(model, positive, negative, sigmas=sigmas,
                                           free_adaln=True, free_pos_embed=True,  # as the pipeline (low memory)
                                           split_cfg=split)  # as the pipeline's plan for the target
            if ignored:
                notes["denoiser_options_ignored"] = ignored
            x, notes["step_s"] = noise, []
            for i in range(args.steps):
                t0 = time.perf_counter()
                x = C.denoise_step(den, x, i, sampler)
                mx.eval(x)
                notes["step_s"].append(time.perf_counter() - t0)
            notes["weights"] = C.parameter_bytes(model)  # what stays after freeing adaLN / the full table
            return x

        name = denoise_stage_name(key, bits, split)
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


def denoise_stage_name(model: str, bits: int, split_cfg: bool) -> str:
    return f"denoise-{model}-{bits}bit" + ("-split-cfg" if split_cfg else "")


def decode_stage_name(tile: Optional[int]) -> str:
    from sd35_mlx.models.vae_tiling import DEFAULT_DECODE_TILE

    return "decode" if tile is None else "decode-tiled" if tile == DEFAULT_DECODE_TILE else f"decode-tiled-{tile * 8}px"


# ---- configurations ------------------------------------------------------------------------------------
def estimator(args, config: Dict[str, Any]):
    from sd35_mlx.memory import MemoryEstimator

    return MemoryEstimator(
        C.truncated(C.MODELS[config["model"]][1], args.layers), t5=C.truncated(T5_XXL, args.layers),
        vae=SD3_VAE, clip_l=C.truncated(CLIP_L, args.layers), clip_g=C.truncated(CLIP_G, args.layers),
        trimmed_transformer=True, split_cfg=True,  # as the pipeline: CFG in two passes when one does not fit
    )  # fmt: skip


def pipeline_choice(args, config: Dict[str, Any]) -> Dict[str, Any]:
    """What the pipeline runs for this configuration under a memory budget of its target:
    the planner's T5 mode (loaded / streamed / dropped) and VAE tiling, with the bits fixed.
    When nothing fits by the planner's estimate, its smallest settings (T5 streamed, VAE
    tiled) are measured and the planner's message is reported."""
    from sd35_mlx.models.vae_tiling import should_tile

    from sd35_mlx.memory import DECODE_TILES, plan_memory, throttle_bytes
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
    choice.update(t5_mode=str(plan.t5), tiled=plan.tile_vae, tile=plan.decode_tile, split_cfg=plan.split_cfg,
                  headroom=plan.headroom,
                  planner={"stages": dict(plan.stages), "peak": plan.peak})  # fmt: skip
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
        encode = ["clip_l", "clip_g"]
        if choice["t5_mode"] != "dropped":
            name = f"t5-{cfg['t5_bits']}bit" + ("-streamed" if choice["t5_mode"] == "streamed" else "")
            if name not in stages:  # no streaming available: the loaded T5 is what runs
                name, choice["t5_mode"] = f"t5-{cfg['t5_bits']}bit", "loaded"
            encode.append(name)
        parts = {
            "encode": max(stages[s].peak for s in encode),
            "denoise": stages[denoise_stage_name(cfg["model"], cfg["transformer_bits"], choice["split_cfg"])].peak,
            "decode": stages[decode_stage_name(choice["tile"] if choice["tiled"] else None)].peak,
        }
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
    headers = ["configuration", "T5", "CFG", "VAE decode", "encode peak", "denoise peak", "decode peak", "**generation peak**",
               "planner estimate", "target"]  # fmt: skip
    table = []
    for r in rows:
        plan = r["planner"]
        est = C.fmt_gb(plan["peak"]) if "peak" in plan else "n/a"
        if "stages" in plan:
            est += " (" + " / ".join(C.fmt_gb(plan["stages"].get(k)).replace(" GB", "") for k in ("encode", "denoise", "decode")) + ")"
        target = "–"
        if r["target"]:
            target = f"≤ {r['target'] / C.GB:.1f} GB " + ("✓" if r["peak"] <= r["target"] else "✗")
        p = r["stage_peaks"]
        decode = f"{r['decode_tile_px']}-px tiles" if r["tiled_decode"] else "whole"
        table.append([r["title"], r["t5_mode"], "two passes" if r["split_cfg"] else "one batch", decode, C.fmt_gb(p["encode"]),
                      C.fmt_gb(p["denoise"]), C.fmt_gb(p["decode"]), f"**{C.fmt_gb(r['peak'])}**", est, target])  # fmt: skip
    lines.append(C.markdown_table(headers, table))
    lines.append(
        "T5 mode, CFG passes and VAE tiling are what the pipeline's memory planner (`sd35_mlx.memory.plan_memory`) "
        "chooses for a budget of the target with these bits; planner estimate: its estimated need of each "
        "stage (encode / denoise / decode, GB; a plan fits when its largest need is within the memory limit, "
        "and queued GPU work fills the rest of the budget)."
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
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "configs": rows,
        "stages": {g: {k: v.to_dict() for k, v in group.items()} for g, group in out["stages"].items()},
        "limits": out["limits"],
        "build_s": out["build_s"],
        "folder_bytes": out["folder_bytes"],
        "wall_s": time.perf_counter() - start,
    }
    key = f"memory-{args.size}" + (f"-layers{args.layers}" if args.layers else "") + ("" if args.throttle == "budget" else f"-throttle-{args.throttle}")
    C.publish(args, info, key, body, payload, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
