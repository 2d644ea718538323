"""python -m sd35_mlx.generate — text-to-image (and img2img) from the command line.

Every flag maps to a field of `GenerationSettings` or an argument of
`SD35Pipeline.from_pretrained`; bad input is rejected before any model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Sequence

from .adapters.spec import parse_lora_arg, specs_from_metadata
from .components import DTYPES, T5_DEFAULT_LENGTH, T5_LENGTH_RANGE
from .control import cli as control_cli
from .errors import InputError, SD35Error
from .settings import DEFAULT_STRENGTH, SAMPLERS, GenerationSettings, SkipLayerGuidance
from .variants import VARIANTS

SLG = SkipLayerGuidance()  # the defaults of the --slg-* flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sd35_mlx.generate",
        usage="%(prog)s -m MODEL (-p PROMPT | --prompt-file FILE | --from-image PNG) [options]",
        description="Generate images with Stable Diffusion 3 / 3.5 in MLX.",
        epilog="Defaults for steps, cfg, sampler, shift and size come from the model variant ("
        + ", ".join(f"{v.name} {v.steps} steps / cfg {v.cfg:g}" for v in VARIANTS.values())
        + "). Images are never overwritten: an existing name gets a -1, -2 … suffix.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", "-m", help="HF repo id, diffusers folder, single .safetensors file or converted folder")
    m.add_argument("--revision", help="hub revision (branch, tag or commit)")
    m.add_argument("--variant", help="variant hint, e.g. sd3.5-large-turbo (normally detected)")
    m.add_argument("--tokenizers", help="repo id or folder with tokenizer/ folders, for single-file models (default: the official repo)")
    m.add_argument("--no-t5", action="store_true", help="T5-drop mode: never load T5; zeros stand in for its tokens")
    m.add_argument("--quantize", help="quantize at load, e.g. 'transformer=4,t5=4'")
    m.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weights/compute precision (T5 never runs in float16)")
    m.add_argument("--keep-loaded", action="store_true", help="keep every network in memory (faster for many images, more memory)")
    m.add_argument("--memory-budget", type=_budget, default="auto", metavar="GB",
                   help="fit the whole generation in GB: chooses quantization, T5 mode, CFG passes and VAE tiling "
                        "(and says so). Default 'auto': what this machine can give (Metal's recommended working "
                        "set, else 85%% of RAM; not with --keep-loaded); 'off': no plan")
    m.add_argument("--stream-t5", action="store_true", help="run T5 one block at a time from disk (slower, far less memory)")
    m.add_argument("--tile-vae", choices=("auto", "on", "off"), default="auto", help="tiled VAE decode")

    g = p.add_argument_group("prompt")
    g.add_argument("--prompt", "-p", help="the prompt")
    g.add_argument("--negative-prompt", "-n", default="", help="negative prompt (default: empty string)")
    g.add_argument("--prompt-file", help="a text file with one prompt per line (blank lines and # comments skipped)")
    g.add_argument("--t5-length", type=int, default=None,
                   help=f"T5 tokens ({T5_LENGTH_RANGE[0]}–{T5_LENGTH_RANGE[1]}, default {T5_DEFAULT_LENGTH}; "
                        "also the zero length in T5-drop mode)")  # fmt: skip
    g.add_argument("--from-image", help="regenerate from the metadata of a PNG written by sd35_mlx (flags given override it)")

    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=int, help="denoising steps")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (≤ 1: a single conditional pass)")
    s.add_argument("--sampler", choices=SAMPLERS, help="default: the variant's")
    s.add_argument("--shift", type=float, help="flow-matching shift (default: the variant's)")
    s.add_argument("--width", "-W", type=int, help="image width, multiple of 16")
    s.add_argument("--height", "-H", type=int, help="image height, multiple of 16")
    s.add_argument("--seed", type=int, nargs="+", help="one or more seeds (default: random)")
    s.add_argument("--num-images", "-N", type=int, default=1, help="images per prompt (seeds seed, seed+1, …)")
    s.add_argument("--slg", action="store_true", help="skip-layer guidance (recommended for 3.5 Medium)")
    s.add_argument("--slg-layers", type=int, nargs="+", default=list(SLG.layers), help="blocks skipped (default %(default)s)")
    s.add_argument("--slg-scale", type=float, default=SLG.scale, help="default %(default)s")
    s.add_argument("--slg-start", type=float, default=SLG.start, help="fraction of the steps (default %(default)s)")
    s.add_argument("--slg-end", type=float, default=SLG.end, help="fraction of the steps (default %(default)s)")
    s.add_argument("--init-image", help="img2img: the starting image")
    s.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help="img2img: how much to change the image (0, 1]")

    control_cli.add_arguments(p)

    d = p.add_argument_group("several processes (started by mlx.launch; docs/distributed.md)")
    d.add_argument("--cfg-parallel", action="store_true",
                   help="2 ranks: rank 0 runs the conditional pass, rank 1 the unconditional one (needs cfg > 1). "
                        "Without it, several ranks share out the images (data-parallel)")
    d.add_argument("--peer-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="stop when the other ranks have not answered for this long (default 300)")

    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora", action="append", default=[], metavar="PATH_OR_REPO[:SCALE]",
                    help="apply a LoRA (file, folder, HF repo id or repo:file; scale default 1.0); repeatable. "
                         "Runs beside quantized weights, never baked into them")
    lo.add_argument("--lora-text-scale", type=float, metavar="SCALE",
                    help="weight of the LoRAs' text-encoder parts (default: each LoRA's own scale)")
    lo.add_argument("--lora-strict", choices=("on", "off"), default="on",
                    help="on: refuse a LoRA with keys that match nothing; off: apply the rest and say how many")

    o = p.add_argument_group("output")
    o.add_argument("--output", "-o", default="sd35.png", help="output PNG (several images get -1, -2 … suffixes)")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def read_prompt_file(path: str) -> List[str]:
    f = Path(path)
    if not f.is_file():
        raise InputError(f"prompt file not found: {path}")
    prompts = [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines()]
    prompts = [x for x in prompts if x and not x.startswith("#")]
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompts")
    return prompts


def plan(args: argparse.Namespace):
    """Turn arguments into (model, [settings…]); raises InputError before anything loads."""
    from .images import read_metadata

    base = GenerationSettings()
    model = args.model
    args.lora_specs = [parse_lora_arg(text, args.lora_text_scale) for text in args.lora]
    t5 = not args.no_t5
    if args.from_image:
        meta = read_metadata(args.from_image)
        base = GenerationSettings.from_dict(meta)
        model = model or meta.get("model")
        if str(meta.get("t5", "")).startswith("dropped") and not args.no_t5:
            t5 = False
        if args.quantize is None and meta.get("quantization") not in (None, "none"):
            args.quantize = meta["quantization"]
        if args.controlnet_quantize is None and meta.get("controlnet_quantization") not in (None, "16"):
            args.controlnet_quantize = meta["controlnet_quantization"]
        if not args.lora:  # the image's LoRAs, unless others are named
            args.lora_specs = specs_from_metadata(meta.get("loras"))
    if not model:
        raise InputError("no model: pass --model (a repo id, a folder or a .safetensors file)")

    prompts: List[str]
    if args.prompt_file:
        prompts = read_prompt_file(args.prompt_file)
    elif args.prompt is not None:
        prompts = [args.prompt]
    elif args.from_image:
        prompts = [base.prompt]
    else:
        raise InputError("no prompt: pass --prompt, --prompt-file or --from-image")
    if isinstance(args.memory_budget, float) and args.memory_budget <= 0:
        raise InputError(f"--memory-budget must be a positive number of GB, 'auto' or 'off' (got {args.memory_budget})")
    if args.num_images < 1:
        raise InputError(f"--num-images must be ≥ 1 (got {args.num_images})")

    overrides = {k: getattr(args, k) for k in ("steps", "cfg", "sampler", "shift", "width", "height") if getattr(args, k) is not None}
    if args.negative_prompt or not args.from_image:
        overrides["negative_prompt"] = args.negative_prompt
    if args.t5_length is not None:
        overrides["t5_length"] = args.t5_length
    if args.slg:
        overrides["skip_layer_guidance"] = SkipLayerGuidance(tuple(args.slg_layers), args.slg_scale, args.slg_start, args.slg_end)
    if args.init_image:
        overrides["init_image"] = args.init_image
        overrides["strength"] = args.strength
    overrides.update(control_cli.overrides(args))
    seeds: List[Optional[int]] = list(args.seed) if args.seed else [base.seed if args.from_image else None]
    jobs = []
    for prompt in prompts:
        for seed in seeds:
            for k in range(args.num_images):
                s = seed + k if seed is not None else None
                jobs.append(replace(base, **overrides, prompt=prompt, seed=s).validate())
    if args.from_image:
        from .control.metadata import check_control_inputs

        for job in jobs:
            check_control_inputs(meta, job)
    return model, t5, jobs


def _budget(text: str):
    """--memory-budget: a number of GB, 'auto' or 'off'."""
    if text.lower() in ("auto", "off"):
        return text.lower()
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, 'auto' or 'off', got {text!r}") from None


def _plans_memory(value, keep_loaded: bool) -> bool:
    """'off' never plans; 'auto' not with --keep-loaded, which keeps every network resident:
    the staged plan would not describe it."""
    return value != "off" and not (value == "auto" and keep_loaded)


def resolve_budget(value, keep_loaded: bool) -> Optional[float]:
    """GB to plan for ('auto' = what this machine can give), or None for no plan."""
    if not _plans_memory(value, keep_loaded):
        return None
    if value == "auto":
        from .memory import default_budget_bytes

        return default_budget_bytes() / 1e9
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _show_library_warnings()
    if _plans_memory(args.memory_budget, args.keep_loaded) and sys.platform.startswith("linux"):
        # MLX's CUDA backend keeps an operation's inputs alive until its command buffer has run.
        # The pipeline holds MLX to the budget (memory.memory_limit), which waits at buffer
        # boundaries: small buffers keep the overshoot near 0.05 GB (1000 MB on an H100 by
        # default: up to 0.25 GB) at the same speed (docs/memory.md). Set before MLX starts.
        os.environ.setdefault("MLX_MAX_MB_PER_BUFFER", "100")
        os.environ.setdefault("MLX_MAX_OPS_PER_BUFFER", "20")
    args.budget_is_auto = args.memory_budget == "auto"
    args.memory_budget = resolve_budget(args.memory_budget, args.keep_loaded)
    try:
        model, t5, jobs = plan(args)
        return run(args, model, t5, jobs)
    except SD35Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _show_library_warnings() -> None:
    """The library logs (truncated prompts, T5 missing, tokenizers fetched): show its warnings
    on stderr, as plain lines, unless the application configured logging itself."""
    logger = logging.getLogger("sd35_mlx")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)


def _largest_size(jobs: List[GenerationSettings]):
    sized = [(j.height, j.width) for j in jobs if j.height and j.width]
    return max(sized, key=lambda hw: hw[0] * hw[1]) if sized else None


def load_loras(pipe, specs, strict: bool) -> None:
    """Apply the LoRAs and say what each did (and when one switches the model's defaults)."""
    for spec in specs:
        lora = pipe.load_lora(spec.source, scale=spec.scale, name=spec.name,
                              text_encoder_scale=spec.text_encoder_scale, strict=strict)  # fmt: skip
        where = ", ".join(lora.components) or "nothing"
        print(f"LoRA {lora.name}: {lora.parsed.format} format, scale {lora.scale:g}, on {where}")
        if spec.sha256 and spec.sha256 != lora.file.sha256:
            print(f"warning: {spec.source} is not the file the image was made with (sha256 {lora.file.sha256[:12]}… "
                  f"instead of {spec.sha256[:12]}…)", file=sys.stderr)
        if lora.preset:
            v = pipe.variant
            print(f"LoRA {lora.name} makes this {v.description}: defaults now {v.steps} steps, cfg {v.cfg:g}, "
                  f"shift {v.shift:g}, sampler {v.sampler} (flags given still win)")


def run(args, model: str, t5: bool, jobs: List[GenerationSettings]) -> int:
    import mlx.core as mx

    from .distributed import (CFGExchange, Ranks, agree_on_budget, agree_on_seeds, check_cfg_parallel,
                              check_data_parallel, exit_on_terminate)  # fmt: skip
    from .images import save_png, unique_paths
    from .pipeline import SD35Pipeline
    from .progress import ProgressBar, peak_memory_gb

    ranks = Ranks.init(timeout_s=args.peer_timeout)  # a group of one unless mlx.launch started us
    if ranks.size > 1:
        exit_on_terminate(ranks.rank)
        if args.memory_budget is not None:
            args.memory_budget = agree_on_budget(ranks, args.memory_budget, machine_wide=args.budget_is_auto)
    if args.cfg_parallel:
        for job in jobs:
            check_cfg_parallel(ranks.size, job.cfg)
    else:
        check_data_parallel(ranks, len(jobs))
    paths = unique_paths(args.output, len(jobs))  # before any rank writes (agree_on_seeds waits for all)
    jobs = agree_on_seeds(ranks, jobs)
    mine = list(enumerate(jobs)) if args.cfg_parallel else ranks.shard(jobs)
    exchange = CFGExchange(ranks) if args.cfg_parallel else None
    quiet = args.quiet or not ranks.is_main  # rank 0 reports

    t0 = time.perf_counter()
    pipe = SD35Pipeline.from_pretrained(
        model, dtype=getattr(mx, args.dtype), t5=t5, low_memory=not args.keep_loaded,
        quantize=args.quantize, revision=args.revision, variant=args.variant,
        tile_vae={"auto": None, "on": True, "off": False}[args.tile_vae],
        stream_t5=args.stream_t5, memory_budget=args.memory_budget,
        plan_size=_largest_size(jobs), tokenizers=args.tokenizers,
        controlnet_quantize=args.controlnet_quantize, controlnets=tuple(sorted({c.path for j in jobs for c in j.controlnets})),
    )  # fmt: skip
    if pipe.plan is not None and not quiet:
        print(pipe.describe_plan())
    if not quiet:
        print(f"model: {model} ({pipe.variant.name}), loaded in {time.perf_counter() - t0:.1f} s")
    load_loras(pipe, getattr(args, "lora_specs", []), strict=args.lora_strict == "on")
    t_start, longest = time.perf_counter(), 0.0
    for n, job in mine:
        t_job = time.perf_counter()
        job = pipe.settings_with_defaults(job)
        if exchange is not None:
            check_cfg_parallel(ranks.size, job.cfg)  # the variant's default cfg is known now
        bar = None if quiet else ProgressBar(job.steps if not job.init_image else None, label=f"[{n + 1}/{len(jobs)}] seed {job.seed}")
        if exchange is not None and not ranks.is_main:
            for _ in pipe.generate_latents(job, cfg_exchange=exchange):  # rank 0 decodes and writes
                pass
            continue
        result = pipe.generate(settings=job, callback=bar, verbose=not quiet, cfg_exchange=exchange)
        path = save_png(result.image, paths[n], result.metadata)
        for saved in control_cli.save_control_images(args.save_control, pipe.control_images, path.stem):
            print(f"control image: {saved}")
        longest = max(longest, time.perf_counter() - t_job)
        if bar is not None:
            bar.close()
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in pipe.timings.items())
            print(f"saved {path}  ({stages}; peak memory {peak_memory_gb():.2f} GB)")
        elif ranks.is_main:
            print(path)
    if ranks.size > 1 and exchange is None:
        _report_data_parallel(ranks, mine, paths, longest, time.perf_counter() - t_start, args.quiet)
    return 0


def _report_data_parallel(ranks, mine, paths, longest: float, seconds: float, quiet: bool) -> None:
    """Rank 0 names the images the other ranks wrote and the throughput of all of them."""
    from .distributed import gather_done

    done = gather_done(ranks, [n for n, _ in mine], len(paths), longest)
    if not ranks.is_main:
        return
    for n, path in enumerate(paths):
        if ranks.owner(n) != 0 and done[n]:
            print(path if quiet else f"saved {path}  (rank {ranks.owner(n)})")
    if not quiet:
        rate = 60 * int(done.sum()) / max(seconds, 1e-9)
        print(f"{int(done.sum())} images on {ranks.size} ranks in {seconds:.1f} s ({rate:.2f} images/min)")


if __name__ == "__main__":
    sys.exit(main())
