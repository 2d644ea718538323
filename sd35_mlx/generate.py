"""python -m sd35_mlx.generate — text-to-image (and img2img) from the command line.

Every flag maps to a field of `GenerationSettings` or an argument of
`SD35Pipeline.from_pretrained`; bad input is rejected before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Sequence

from ._version import __version__
from .adapters.spec import parse_lora_arg, specs_from_metadata
from .checks import MAX_IMAGES, MAX_PROMPT_FILE_BYTES, positive_gb, text, whole_number
from .cli import OneLineParser, setup_logging
from .components import DTYPES, T5_DEFAULT_LENGTH, T5_LENGTH_RANGE
from .control import cli as control_cli
from .errors import InputError, SD35Error
from .sampling.schedule import IMG2IMG_RULES
from .settings import DEFAULT_STRENGTH, SAMPLERS, GenerationSettings, SkipLayerGuidance
from .variants import VARIANTS

SLG = SkipLayerGuidance()  # the defaults of the --slg-* flags


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m sd35_mlx.generate",
        usage="%(prog)s -m MODEL (-p PROMPT | --prompt-file FILE | --from-image PNG) [options]",
        description="Generate images with Stable Diffusion 3 / 3.5 in MLX.",
        epilog="Defaults for steps, cfg, sampler, shift and size come from the model variant ("
        + ", ".join(f"{v.name} {v.steps} steps / cfg {v.cfg:g}" for v in VARIANTS.values())
        + "). Images are never overwritten: an existing name gets a -1, -2 … suffix. "
        "Installed as the console script sd35-generate.",
    )
    p.add_argument("--version", action="version", version=f"sd35_mlx {__version__}")
    m = p.add_argument_group("model")
    m.add_argument("--model", "-m", help="HF repo id, diffusers folder, single .safetensors file or converted folder")
    m.add_argument("--revision", help="hub revision (branch, tag or commit)")
    m.add_argument("--variant", help="variant hint, e.g. sd3.5-large-turbo (normally detected)")
    m.add_argument("--tokenizers", help="repo id or folder with tokenizer/ folders, for single-file models (default: the official repo)")
    m.add_argument("--no-t5", action="store_true", help="T5-drop mode: never load T5; zeros stand in for its tokens")
    m.add_argument("--quantize", help="quantize at load, e.g. 'transformer=4,t5=4' (no -q here: in convert -q quantizes)")
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
    g.add_argument("--from-image", help="regenerate from the metadata of a PNG written by sd35_mlx (flags given override it; "
                   "the model it names is used only with --trust-metadata-model, its init image only if passed again)")
    g.add_argument("--trust-metadata-model", action="store_true",
                   help="with --from-image and no --model: load (or download) the model the PNG's metadata names")

    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=int, help="denoising steps")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (≤ 1: a single conditional pass)")
    s.add_argument("--sampler", choices=SAMPLERS, help="default: the variant's")
    s.add_argument("--shift", type=float, help="flow-matching shift (default: the variant's)")
    s.add_argument("--width", "-W", type=int, help="image width, multiple of 16")
    s.add_argument("--height", "-H", type=int, help="image height, multiple of 16")
    s.add_argument("--seed", type=int, nargs="+", help="one or more seeds (default: random)")
    s.add_argument("--num-images", "-N", type=int, default=1,
                   help="images per seed: seed, seed+1, … (seed ranges that overlap are refused)")
    s.add_argument("--slg", action="store_true", help="skip-layer guidance (recommended for 3.5 Medium)")
    # None = not given (the defaults are SkipLayerGuidance's), so that a flag without effect can be named
    s.add_argument("--slg-layers", type=int, nargs="+", help=f"with --slg: blocks skipped (default {' '.join(map(str, SLG.layers))})")
    s.add_argument("--slg-scale", type=float, help=f"with --slg (default {SLG.scale})")
    s.add_argument("--slg-start", type=float, help=f"with --slg: fraction of the steps (default {SLG.start})")
    s.add_argument("--slg-end", type=float, help=f"with --slg: fraction of the steps (default {SLG.end})")
    s.add_argument("--init-image", help="img2img: the starting image")
    s.add_argument("--strength", type=float, help=f"img2img: how much to change the image, (0, 1] (default {DEFAULT_STRENGTH})")
    s.add_argument("--img2img-rule", choices=IMG2IMG_RULES,
                   help="img2img: 'diffusers' (default) skips int(N − N·strength) steps and measures the SLG window "
                        "on the steps run; 'stability' (SAI's sd3_infer.py) skips int(N·(1 − strength)) and measures "
                        "it on all N")  # fmt: skip

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
    o.add_argument("--output", "-o", default="sd35.png",
                   help="output PNG; may carry {seed} and {index} (e.g. 'out-{seed}.png'); a taken name gets -1, -2 …")
    o.add_argument("--quiet", action="store_true", help="print only the paths written (and warnings, errors)")
    return p


def read_prompt_file(path: str) -> List[str]:
    """One prompt per line (blank lines and # comments skipped); UTF-8 text of bounded size."""
    f = Path(path)
    if not f.is_file():
        raise InputError(f"prompt file not found: {path}")
    if f.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise InputError(f"prompt file {path} is {f.stat().st_size:,} bytes; at most {MAX_PROMPT_FILE_BYTES:,} (is it the right file?)")
    data = f.read_bytes()
    if b"\0" in data:
        raise InputError(f"prompt file {path} is binary (it holds NUL bytes), not text with one prompt per line")
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"prompt file {path} is not UTF-8 text (byte {data[e.start]:#04x} on line {line}); save it as UTF-8") from None
    prompts = [ln.strip() for ln in content.splitlines()]
    prompts = [x for x in prompts if x and not x.startswith("#")]
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompts")
    if len(prompts) > MAX_IMAGES:
        raise InputError(f"prompt file {path} holds {len(prompts):,} prompts; at most {MAX_IMAGES:,} per run")
    return prompts


def settings_from_image(args: argparse.Namespace):
    """(settings, model, t5, quantization, LoRAs, the metadata as read) from --from-image, every
    field checked like a flag.

    The metadata is untrusted: it may name any repo or file. Its model is used only when the
    user asks for it (--trust-metadata-model), its init image only when passed again.
    """
    from .images import read_metadata
    from .quantize import parse_quantize

    png = args.from_image
    recorded = read_metadata(png)
    meta = dict(recorded)
    recorded_init = meta.pop("init_image", None)
    recorded_mask = meta.pop("mask", None)  # like the init image: a file, read only when passed again
    try:
        base = GenerationSettings.from_dict(meta)
        model = meta.get("model")
        if model is not None:
            model = text("model", model, 4096)
        quantization = meta.get("quantization")
        if quantization not in (None, "none"):
            parse_quantize(text("quantization", quantization, 200), defaults=False)
        t5 = meta.get("t5", "")
        if not isinstance(t5, str):
            raise InputError(f"t5 must be text such as 't5xxl:256' (got {t5!r:.60})")
    except InputError as e:
        raise InputError(f"{png}: metadata field {e}") from None
    if recorded_init is not None and not args.init_image:
        raise InputError(f"{png} was made by img2img from {recorded_init!r:.200}; pass --init-image PATH to "
                         "regenerate it (a path named only by metadata is never read)")  # fmt: skip
    if recorded_mask is not None and not args.mask:
        raise InputError(f"{png} was inpainted with the mask {recorded_mask!r:.200}; pass --mask PATH to regenerate "
                         "it (a path named only by metadata is never read)")  # fmt: skip
    if base.controlnets and not args.controlnet and not args.trust_metadata_model:
        raise InputError(f"{png} was made with ControlNets; pass them again (--controlnet, --control-image) or "
                         "--trust-metadata-model: files named only by metadata are never read")  # fmt: skip
    loras = _metadata_loras(png, meta.get("loras"), args)
    if args.model is None:
        if model is None:
            raise InputError(f"{png}'s metadata names no model: pass --model")
        if not args.trust_metadata_model:
            raise InputError(f"{png} was made with {model!r:.200}; pass --model {model:.200} (or "
                             "--trust-metadata-model) to use it: a model named only by metadata is never loaded")  # fmt: skip
    recorded_cq = meta.get("controlnet_quantization")
    if args.controlnet_quantize is None and recorded_cq not in (None, "16"):
        args.controlnet_quantize = text("controlnet_quantization", recorded_cq, 200)
    quantize = args.quantize if args.quantize is not None else (None if quantization in (None, "none") else quantization)
    return base, args.model or model, not t5.startswith("dropped"), quantize, loras, recorded


def _metadata_loras(png: str, records, args: argparse.Namespace):
    """The LoRAs the image records: checked, and (files or repos named only by metadata) used
    only with --trust-metadata-model; --lora given replaces them."""
    try:
        specs = specs_from_metadata(records)
        for spec in specs:  # (LoRASpec checks its scales)
            text("loras.source", spec.source, 4096)
    except (TypeError, ValueError) as e:  # float("x") inside, or InputError (a ValueError)
        raise InputError(f"{png}: metadata field {e}") from None
    if specs and not args.lora and not args.trust_metadata_model:
        names = " ".join(f"--lora {s.source}:{s.scale:g}" for s in specs)
        raise InputError(f"{png} was made with LoRAs; pass them again ({names:.300}) or --trust-metadata-model: "
                         "files named only by metadata are never read")  # fmt: skip
    return specs if not args.lora else None


def expand_seeds(seeds: Optional[Sequence[int]], per_seed: int) -> List[Optional[int]]:
    """Each seed s gives `per_seed` images with seeds s, s+1, …; ranges that overlap would make
    the same image twice, so they are refused (with a suggestion)."""
    whole_number("--num-images", per_seed, 1, MAX_IMAGES)
    if not seeds:
        return [None] * per_seed
    if len(seeds) > MAX_IMAGES:
        raise InputError(f"--seed lists {len(seeds):,} seeds; at most {MAX_IMAGES:,} per run")
    out: List[Optional[int]] = []
    for seed in seeds:
        whole_number("seed", seed, 0, 2**63 - per_seed)
        out.extend(range(seed, seed + per_seed))
    if len(set(out)) != len(out):
        dup = next(x for x in out if out.count(x) > 1)
        raise InputError(f"--seed {' '.join(map(str, seeds))} with -N {per_seed} asks for seed {dup} twice "
                         f"(each seed s gives seeds s … s+{per_seed - 1}); pass seeds at least {per_seed} apart")  # fmt: skip
    return out


def plan(args: argparse.Namespace):
    """Turn arguments into (model, t5, [settings…]); raises InputError before anything loads."""
    base = GenerationSettings()
    model, t5 = args.model, not args.no_t5
    args.lora_specs = [parse_lora_arg(text, args.lora_text_scale) for text in args.lora]
    if args.from_image:
        base, model, t5_recorded, args.quantize, recorded_loras, metadata = settings_from_image(args)
        t5 = t5 and t5_recorded
        if recorded_loras is not None:  # the image's LoRAs, unless others are named
            args.lora_specs = recorded_loras
    if not model:
        raise InputError("no model: pass --model (a repo id, a folder or a .safetensors file)")
    text("--model", model, 4096)

    prompts: List[str]
    if args.prompt_file:
        prompts = read_prompt_file(args.prompt_file)
    elif args.prompt is not None:
        prompts = [args.prompt]
    elif args.from_image:
        prompts = [base.prompt]
    else:
        raise InputError("no prompt: pass --prompt, --prompt-file or --from-image")
    overrides = {k: getattr(args, k) for k in ("steps", "cfg", "sampler", "shift", "width", "height") if getattr(args, k) is not None}
    if args.negative_prompt or not args.from_image:
        overrides["negative_prompt"] = args.negative_prompt
    if args.t5_length is not None:
        overrides["t5_length"] = args.t5_length
    slg = {k: getattr(args, f"slg_{k}") for k in ("layers", "scale", "start", "end") if getattr(args, f"slg_{k}") is not None}
    if args.slg:
        overrides["skip_layer_guidance"] = SkipLayerGuidance(**{**slg, "layers": tuple(slg.get("layers", SLG.layers))})
    if args.init_image:
        overrides["init_image"] = args.init_image
        overrides["strength"] = DEFAULT_STRENGTH if args.strength is None else args.strength
    if args.img2img_rule is not None:
        overrides["img2img_rule"] = args.img2img_rule
    overrides.update(control_cli.overrides(args))
    seeds = expand_seeds(args.seed or ([base.seed] if args.from_image and base.seed is not None else None), args.num_images)
    if len(prompts) * len(seeds) > MAX_IMAGES:
        raise InputError(f"{len(prompts):,} prompts × {len(seeds):,} seeds is {len(prompts) * len(seeds):,} images; at most {MAX_IMAGES:,} per run")
    settings = replace(base, **overrides).validate()  # one check of the shared fields, then per image
    jobs = [replace(settings, prompt=prompt, seed=seed).validate() for prompt in prompts for seed in seeds]
    if args.from_image:  # the control images and mask passed again are the recorded ones
        from .control.metadata import check_control_inputs

        for job in jobs:
            check_control_inputs(metadata, job)
    check_output(args.output, jobs)
    _warn_unused(args, slg)
    return model, t5, jobs


def _warn_unused(args: argparse.Namespace, slg_flags: dict) -> None:
    """Flags that do nothing in this combination are named (they do not stop the run)."""
    unused = [(f"--slg-{k}", "--slg") for k in slg_flags if not args.slg]
    if not args.init_image:
        unused += [(f, "--init-image") for f, v in (("--strength", args.strength), ("--img2img-rule", args.img2img_rule)) if v is not None]
    if args.trust_metadata_model and not args.from_image:
        unused.append(("--trust-metadata-model", "--from-image"))
    for flag, needs in unused:
        print(f"warning: {flag} has no effect without {needs}", file=sys.stderr)


def planned_paths(template: str, jobs: List[GenerationSettings]) -> List[Path]:
    """The names the images will get: the template filled in per image, then `-1`, `-2` … where
    a name is taken (by a file, or by an earlier image of this run)."""
    from .images import unique_path

    names: List[Path] = []
    for n, job in enumerate(jobs):
        names.append(unique_path(output_path(template, job, n + 1), names))
    return names


def output_path(template: str, job: GenerationSettings, index: int) -> Path:
    """The output name for one image: `template` with {seed} and {index} filled in."""
    try:
        return Path(template.format(seed=job.seed, index=index))
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise InputError(f"--output {template!r}: only {{seed}} and {{index}} may be filled in ({e})") from None


def check_output(template: str, jobs: List[GenerationSettings]) -> None:
    """Refuse, before anything loads, a name the writer cannot honour or a folder it cannot write."""
    from .images import check_png_name

    text("--output", template, 4096)
    path = check_png_name(output_path(template, replace(jobs[0], seed=jobs[0].seed or 0), 1))
    folder = path.parent.absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:  # a real probe: permission bits say nothing for root, read-only mounts or /proc
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a folder")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise InputError(f"cannot write images into {folder}: {e}") from None


def _budget(value: str):
    """--memory-budget: a number of GB, 'auto' or 'off'."""
    if value.lower() in ("auto", "off"):
        return value.lower()
    try:
        return positive_gb("--memory-budget", float(value))
    except (ValueError, InputError):
        raise argparse.ArgumentTypeError(f"expected a number of GB, 'auto' or 'off', got {value!r} (a number must be finite and > 0)") from None


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
    setup_logging()
    if (_plans_memory(args.memory_budget, args.keep_loaded) or args.keep_loaded) and sys.platform.startswith("linux"):
        # MLX's CUDA backend keeps an operation's inputs alive until its command buffer has
        # run; the pipeline holds MLX to a memory limit (the budget's, or kept loaded, what is
        # resident + the largest stage's need), which waits at buffer boundaries.
        from .memory import use_small_command_buffers

        use_small_command_buffers()
    args.budget_is_auto = args.memory_budget == "auto"
    args.memory_budget = resolve_budget(args.memory_budget, args.keep_loaded)
    try:
        model, t5, jobs = plan(args)
        if args.from_image and not args.quiet:  # untrusted input: say what it will make us read
            init = f", init image {jobs[0].init_image}" if jobs[0].init_image else ""
            print(f"from {args.from_image}: model {model}{'' if t5 else ' (T5 dropped)'}{init}, "
                  f"quantization {args.quantize or 'none'}")  # fmt: skip
        return run(args, model, t5, jobs)
    except SD35Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _largest_size(jobs: List[GenerationSettings]):
    from .images import init_image_size

    # img2img: a side not given follows the init image (its header is read, nothing more)
    sized = [init_image_size(j.init_image, j.width, j.height)[::-1] if j.init_image else (j.height, j.width)
             for j in jobs]  # fmt: skip
    sized = [(h, w) for h, w in sized if h and w]
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
    from .pipeline import SD35Pipeline
    from .progress import Progress, peak_memory_gb

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
    # Names are planned before any rank writes (agree_on_seeds waits for all); a {seed} template
    # needs the seeds first. Writes claim their names exclusively either way (images.save_png).
    paths = None if "{seed}" in args.output else planned_paths(args.output, jobs)
    jobs = agree_on_seeds(ranks, jobs)
    paths = paths or planned_paths(args.output, jobs)
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
        plan_init_image=any(j.init_image is not None for j in jobs),
    )  # fmt: skip
    if pipe.plan is not None and pipe.plan_changes and not quiet:
        print(pipe.describe_plan())
    if not quiet:
        print(f"model: {pipe.name} ({pipe.variant.name}), ready in {time.perf_counter() - t0:.1f} s")
    load_loras(pipe, getattr(args, "lora_specs", []), strict=args.lora_strict == "on")  # may change the defaults
    # Every image is checked against this model (size vs its position grid, SLG layers vs its
    # depth) before the first one starts: no network weight has been read yet (they are lazy).
    jobs = [pipe.settings_with_defaults(job) for job in jobs]
    mine = [(n, jobs[n]) for n, _ in mine]
    t_start, longest, failed = time.perf_counter(), 0.0, 0
    for n, job in mine:
        t_job = time.perf_counter()
        if exchange is not None:
            check_cfg_parallel(ranks.size, job.cfg)  # the variant's default cfg is known now
        progress = None if quiet else Progress(job, label=f"[{n + 1}/{len(jobs)}] seed {job.seed}")
        if exchange is not None and not ranks.is_main:
            for _ in pipe.generate_latents(job, cfg_exchange=exchange):  # rank 0 decodes and writes
                pass
            continue
        result = pipe.generate(settings=job, callback=progress, verbose=not quiet, cfg_exchange=exchange)
        path, saved = save_or_fallback(result, paths[n])
        failed += not saved
        for control_path in control_cli.save_control_images(args.save_control, pipe.control_images, path.stem):
            print(f"control image: {control_path}")
        longest = max(longest, time.perf_counter() - t_job)
        if progress is not None:
            progress.close()
            stages = ", ".join(f"{k} {v:.1f} s" for k, v in pipe.timings.items())
            print(f"saved {path}  ({stages}; peak memory {peak_memory_gb():.2f} GB)")
        elif ranks.is_main:
            print(path)
    if ranks.size > 1 and exchange is None:
        _report_data_parallel(ranks, mine, paths, longest, time.perf_counter() - t_start, args.quiet)
    return 1 if failed else 0


def save_or_fallback(result, path: Path):
    """Save the image; if that fails (disk full, folder gone), save it in the temp folder and
    say where: a finished image is never dropped. Returns (path written, whether as asked)."""
    from .images import save_png

    try:
        return save_png(result.image, path, result.metadata), True
    except OSError as e:
        fallback = save_png(result.image, Path(tempfile.gettempdir()) / path.name, result.metadata)
        print(f"error: could not write {path} ({e}); the image was saved as {fallback} instead", file=sys.stderr)
        return fallback, False


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
