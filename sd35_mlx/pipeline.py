"""SD35Pipeline: prompt → conditioning → latents (step by step) → pixels.

Networks are loaded when first needed and, with `low_memory=True`, released as soon as
their stage is over (encoders after encoding, the transformer after denoising), so peak
memory is the largest stage rather than the sum.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from ._version import __version__
from .adapters.registry import LoRARegistry
from .callbacks import GenerationInterrupted, StepCallback, StepInfo
from .checks import positive_gb
from .components import QUANTIZABLE, REQUIRED, T5_DEFAULT_LENGTH, TEXT_ENCODERS, T5Mode, dtype_name
from .conditioning import Conditioning, assemble
from .cpu_compute import use_float32_compute
from .control.metadata import control_metadata
from .control.prepare import ControlSession
from .denoise import Denoiser
from .errors import InputError, MissingTokenizersError
from .images import init_image_size, load_image, to_pil
from .load_options import LoadOptions
from .memory import Plan, default_budget_bytes, memory_limit
from .quantize import QuantSpec, Quantization, named_quantization, quantization_text, quantize_network
from .sampling import flow_sigmas, img2img_sigmas, make_sampler, scale_noise, uses_cfg
from .settings import GenerationSettings, SkipLayerGuidance
from .variants import Variant, detect_variant, lora_preset, validate_size
from .weights.sources import ModelSources, resolve_sources

log = logging.getLogger(__name__)


@dataclass
class PromptEmbeddings:
    """An encoded prompt (and its negative), reusable across generations."""

    positive: Conditioning
    negative: Optional[Conditioning]
    t5_length: int
    t5_dropped: bool
    prompt: Optional[str] = None  # the texts encoded (recorded in the metadata of what they make)
    negative_prompt: Optional[str] = None


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image.Image
    seed: int
    metadata: Dict[str, Any]
    latents: mx.array = field(repr=False)


class SD35Pipeline:
    """Holds the model's resolved sources, its typed load plan (a `QuantSpec` or None per
    network, a `T5Mode`) and, with a memory budget, the planner's `Plan`; loads each network
    when its stage needs it."""

    def __init__(self, path: Union[Path, ModelSources], *, name: str, options: LoadOptions = LoadOptions()):
        """path: a local model (or its `ModelSources`); `from_pretrained` also takes repo ids."""
        o = options
        self.sources: ModelSources = path if isinstance(path, ModelSources) else resolve_sources(path, _wanted(o.t5))
        self.path = self.sources.path
        self.name = name
        self.options = o
        self.dtype = o.dtype
        self.low_memory = o.low_memory
        self.tile_vae = o.tile_vae
        self.t5_mode = T5Mode.DROPPED if not o.t5 else T5Mode.STREAMED if o.stream_t5 else T5Mode.LOADED
        if self.t5_mode != T5Mode.DROPPED and not self.sources.has("t5"):
            log.warning("%s: no T5-XXL text encoder found; continuing without T5", self.path)
            self.t5_mode = T5Mode.DROPPED
        # {component: QuantSpec or None}: what was named, and how a converted folder stores it
        self.quantization: Quantization = self._fixed_quantization(named_quantization(o.quantize))
        self.budget_bytes: Optional[int] = None if o.memory_budget is None else _budget_bytes(o.memory_budget)
        self.controlnet_quantization: Optional[QuantSpec] = _controlnet_quantization(o.controlnet_quantize)
        self.planned_controlnets = tuple(o.controlnets)  # the memory plan counts them in the denoise stage
        self.planned_init_image = o.plan_init_image  # the memory plan counts its VAE encode
        self.plan: Optional[Plan] = None
        self._plan_without_loras: Optional[Plan] = None  # the plan as made; LoRAs' factors are added to it
        self.plan_changes = False  # whether the plan changes how the model runs
        self.plan_size: Optional[Tuple[int, int]] = None
        self._transformer = None
        self._vae = None
        self._encoders = None
        self._preview_projection = None
        self._kept_need: Optional[int] = None  # low_memory=False: see _within_budget
        self._kept_need_size: Optional[Tuple[int, int, int]] = None
        self._controlnets: Dict[Tuple[str, ...], Any] = {}  # loaded with, and released with, the transformer
        self.control_images: list = []
        self.control_specs: list = []
        self._control_session = None
        self._loras = LoRARegistry()
        self._base_variant: Optional[Variant] = None  # set while a distilling LoRA sets the defaults
        # Building the transformer is lazy in MLX (no weights are read until used), so
        # the variant can be detected from its configuration up front.
        config = self._load_transformer().config
        self.transformer_config = config
        self.context_dim = config.context_dim
        hint = o.variant or self.sources.recorded_variant or name
        self.variant: Variant = detect_variant(config, hint=hint)
        self.tokenizers = self._load_tokenizers(o.tokenizers)
        if self.use_t5 and self.tokenizers.t5 is None:
            raise InputError(f"{self.path}: no T5 tokenizer (tokenizer_3/) found; pass t5=False to run without T5")
        if o.low_memory:
            self._transformer = None
        if self.budget_bytes is not None:
            self._apply_memory_plan(config, o.plan_size)
        self.timings: Dict[str, float] = {}

    # ---- the load plan, typed ----
    @property
    def use_t5(self) -> bool:
        return self.t5_mode != T5Mode.DROPPED

    @property
    def stream_t5(self) -> bool:
        return self.t5_mode == T5Mode.STREAMED

    @property
    def memory_budget(self) -> Optional[float]:
        """The budget in GB (None: no plan)."""
        return None if self.budget_bytes is None else self.budget_bytes / 1e9

    @property
    def quantize(self) -> Optional[str]:
        """The load-time quantization as text ('transformer=4,t5=4'), None when there is none."""
        text = quantization_text(self.quantization)
        return None if text == "none" else text

    def _fixed_quantization(self, named: Quantization) -> Quantization:
        """What the user named, with what a converted folder stores (already quantized networks
        load as stored: they are not quantized again)."""
        fixed = dict(named)
        for c in QUANTIZABLE:
            stored = self.sources.stored_quantization(c)
            if stored is None:
                continue
            if c in named and named[c] != stored:
                wanted = named[c].label if named[c] else "16-bit"
                log.warning("%s: the %s is stored as %s; using it as stored (not %s)", self.path, c, stored.label, wanted)
            fixed[c] = stored
        return fixed

    def _within_budget(self):
        """Hold MLX's memory limit just below the budget while a stage runs (see memory_limit)."""
        return memory_limit(self._stage_limit_bytes())

    def _stage_limit_bytes(self) -> Optional[int]:
        """MLX's memory limit for the stage about to run (None: none): under a budget the
        budget's (`budget_limit`); kept loaded without one, what is resident now + the largest
        stage's own need. Taken once per stage, before it runs: while it runs, active memory
        includes the work queued ahead, and a limit taken then would rise with it."""
        from .memory import budget_limit, throttle_margin

        if not self.budget_bytes:
            if self.low_memory or self._kept_need is None:
                return None
            # Without a limit, MLX's GPU backends run ever further ahead of the device once its
            # buffer cache is warm (H200, Medium 1024²: peaks 28.7, 38.6, 41.1 GB over the first
            # generations).
            return mx.get_active_memory() + self._kept_need + throttle_margin()
        return budget_limit(self.budget_bytes, self.plan)

    def _dequantizes_per_block(self) -> bool:
        """Whether a quantized block's layers de-quantize together (the Denoiser's
        dequantize_per_block): `memory.dequantizes_per_block` for this transformer's blocks."""
        from .memory import dequantizes_per_block

        return dequantizes_per_block(self.budget_bytes, self.plan, self._load_transformer().block_dense_bytes())

    def _prepare_kept_loaded_limit(self, height: int, width: int, t5_tokens: int) -> None:
        """Kept loaded without a budget: the largest stage's own need at this size, from the
        planner's estimator (the largest size so far counts, so a smaller image never
        tightens the limit of a larger one encoded before it)."""
        if self.low_memory or self.budget_bytes:
            return
        key = (height, width, t5_tokens)
        if self._kept_need_size is not None and height * width <= self._kept_need_size[0] * self._kept_need_size[1]:
            return
        from .memory import own_need_bytes

        transformer = self._load_transformer()
        # + a quantized block's 16-bit weights, alive together while it runs (Denoiser's dequantize_per_block)
        self._kept_need = own_need_bytes(self._estimator(transformer.config), height, width, t5_tokens) + (
            transformer.block_dense_bytes()
        )
        self._kept_need_size = key

    # ---- construction ----
    @classmethod
    def from_pretrained(
        cls, model: Union[str, Path], options: Optional[LoadOptions] = None, **overrides: Any
    ) -> "SD35Pipeline":
        """Load from a Hugging Face repo id, a diffusers folder, a single file or a converted folder.

        How: a `LoadOptions`, and/or its fields as keywords (they override it), e.g.
        `from_pretrained("stabilityai/stable-diffusion-3.5-medium", quantize="transformer=4",
        memory_budget=8.0)`. See `LoadOptions` for every option and its default.
        """
        from .hub import resolve_model_path

        try:
            o = replace(options or LoadOptions(), **overrides)
        except TypeError:
            names = ", ".join(f.name for f in fields(LoadOptions))
            unknown = ", ".join(sorted(set(overrides) - {f.name for f in fields(LoadOptions)}))
            raise TypeError(f"from_pretrained got unknown option(s) {unknown}; the options are {names}") from None
        if o.memory_budget is not None:  # before any download
            _budget_bytes(o.memory_budget)
        # parsed here, once: a bad spec fails before any download
        o = replace(o, quantize=named_quantization(o.quantize))
        local = Path(str(model)).expanduser()
        # Absolute from here on: recorded in the metadata, and read lazily (after a chdir, too).
        name = os.path.abspath(local) if local.exists() else str(model)  # (a symlink's name kept)
        path = resolve_model_path(name, revision=o.revision, components=_wanted(o.t5) + ("tokenizers",))
        return cls(resolve_sources(path, _wanted(o.t5)), name=name, options=o)

    def _load_tokenizers(self, source: Optional[str]):
        """From `source`, else the model path, else (Stability single files ship none) the
        official diffusers repo of the detected variant, tokenizer files only (~3 MB)."""
        from .hub import resolve_model_path
        from .loading import load_tokenizers

        if source is not None:
            return load_tokenizers(resolve_model_path(source, components=("tokenizers",)))
        try:
            return load_tokenizers(self.path)
        except MissingTokenizersError as first:  # damaged ones are reported, not replaced
            repo = self.variant.repo_id
            if repo is None:
                raise InputError(f"{first} Pass tokenizers=<a diffusers repo id or folder> (CLI: --tokenizers).") from first
            log.warning("%s has no tokenizer files; using those of %s", self.path, repo)
            return load_tokenizers(resolve_model_path(repo, components=("tokenizers",)))

    def _apply_memory_plan(self, config, size: Optional[Tuple[int, int]]) -> None:
        """Choose quantization, T5 mode and tiling for the budget; what is fixed stays."""
        from .memory import plan_memory

        height, width = size or (self.variant.default_size, self.variant.default_size)
        self.plan_size = (height, width)
        fixed = {c: self.quantization[c] for c in ("transformer", "t5") if c in self.quantization}
        t5_mode = None if self.t5_mode == T5Mode.LOADED else self.t5_mode  # asked to stream or drop: kept
        self.plan = plan_memory(self._estimator(config), self.budget_bytes, height, width, fixed=fixed, t5_mode=t5_mode)
        self._plan_without_loras = self.plan
        before = (dict(self.quantization), self.t5_mode, self.tile_vae)
        for c, spec in self.plan.quantization().items():
            self.quantization.setdefault(c, spec)
        self.t5_mode = self.plan.t5
        if self.tile_vae is None:
            self.tile_vae = self.plan.tile_vae or None  # None: still decided per image size
        # Whether the plan changes how the model runs (the CLI says so only then).
        self.plan_changes = (any(v is not None and c not in before[0] for c, v in self.quantization.items())
                             or self.t5_mode != before[1] or self.tile_vae != before[2] or self.plan.split_cfg)  # fmt: skip
        log.info("%s", self.describe_plan())

    def describe_plan(self) -> str:
        """One line: the memory plan and the budget and size it was made for ('' without a plan)."""
        if self.plan is None:
            return ""
        from .memory import GB, expected_peak

        height, width = self.plan_size
        peak = expected_peak(self.budget_bytes, self.plan) / GB
        return (f"memory plan for {round(self.memory_budget, 1):g} GB at {width}x{height}: {self.plan.describe()}; "
                f"expected peak {peak:.2f} GB")  # fmt: skip

    def _estimator(self, config):
        """Estimates from this model's own networks (built lazily: no weights are read)."""
        from .loading import load_text_encoders, load_vae
        from .memory import MemoryEstimator

        enc = load_text_encoders(self.sources, t5=self.use_t5)
        kwargs = dict(clip_l=enc.clip_l.config, clip_g=enc.clip_g.config, vae=load_vae(self.sources).config)
        if enc.t5 is not None:
            kwargs["t5"] = enc.t5.config
        if self.planned_controlnets:
            from .control.spec import open_controlnet

            specs = [open_controlnet(c, num_heads=config.num_heads) for c in self.planned_controlnets]
            kwargs["controlnets"] = [(s.config, s.quantization(self.controlnet_quantization)) for s in specs]
        return MemoryEstimator(config, trimmed_transformer=self.low_memory, split_cfg=True,
                               init_image=self.planned_init_image, **kwargs)  # fmt: skip

    def _plan_init_image(self) -> None:
        """An init image to encode under a plan made without one: the plan gains that stage (at
        the plan's size), or the generation is refused here, before any network loads."""
        if self.plan is None or self.planned_init_image:
            return
        from .memory import plan_with

        self.planned_init_image = True
        before = self._plan_without_loras
        try:
            self._plan_without_loras = plan_with(self._estimator(self.transformer_config), before, self.budget_bytes,
                                                 *self.plan_size)  # fmt: skip
            self._plan_loras()  # the LoRAs' factors held again, on the new stages
        except InputError as e:
            self.planned_init_image, self._plan_without_loras = False, before
            raise InputError(f"{e} (The plan was made without an init image: plan_init_image=True lets the "
                             "planner choose for it; the CLI does.)") from None
        log.info("%s", self.describe_plan())

    # ---- networks, loaded on demand ----
    def _quantize(self, model, component: str):
        """Quantize a freshly loaded network by the plan (a converted one is already as stored)."""
        from .quantize import quantize_network

        spec = self.quantization.get(component)
        if spec is None or spec == self.sources.stored_quantization(component):
            return model
        return quantize_network(model, spec, component)

    def _load_transformer(self):
        if self._transformer is None:
            from .loading import load_transformer

            transformer = self._quantize(load_transformer(self.sources, dtype=self.dtype), "transformer")
            self._transformer = self._loras.attach_all(transformer, "transformer")
        return self._transformer

    def _load_vae(self):
        if self._vae is None:
            from .loading import load_vae

            self._vae = load_vae(self.sources, dtype=self.dtype)
            use_float32_compute(self._vae)  # the CPU only: 16-bit weights, float32 convolutions
        return self._vae

    def _load_encoders(self):
        if self._encoders is None:
            from .fast_quantized import use_dequantized_matmul
            from .loading import load_text_encoders

            enc = load_text_encoders(self.sources, dtype=self.dtype, t5=self.t5_mode == T5Mode.LOADED)
            if self.t5_mode == T5Mode.LOADED and enc.t5 is None:
                self.t5_mode = T5Mode.DROPPED  # the loader found no T5 weights and said so: T5-drop mode
            for name in TEXT_ENCODERS:
                if getattr(enc, name) is not None:
                    setattr(enc, name, self._quantize(getattr(enc, name), name))
                    use_dequantized_matmul(getattr(enc, name))  # quantized encoders: dequantize before large matmuls
                    self._loras.attach_all(getattr(enc, name), name)
                    use_float32_compute(getattr(enc, name))  # the CPU only: float32 matmuls
            if self.t5_mode == T5Mode.STREAMED:
                from .streaming import streamed_t5

                enc.t5 = streamed_t5(self.sources, quantize=self.quantization.get("t5"), dtype=self.dtype)
            self._encoders = enc
        return self._encoders

    def _load_controlnet(self, spec):
        """A ControlNet (sd35_mlx.control.spec), cached until the transformer is released."""
        key = tuple(str(f) for f in spec.files)
        if key not in self._controlnets:
            net = spec.load(dtype=self.dtype)
            if self.controlnet_quantization is not None and not spec.converted:  # a converted one loads as stored
                quantize_network(net, self.controlnet_quantization, "controlnet")
            self._controlnets[key] = net
        return self._controlnets[key]

    # ---- LoRAs (sd35_mlx/adapters): kept across network reloads, switched without reloading ----
    def load_lora(self, source, scale: float = 1.0, *, name: Optional[str] = None,
                  text_encoder_scale: Optional[float] = None, strict: bool = True, revision: Optional[str] = None):  # fmt: skip
        """Apply a LoRA (local .safetensors, HF repo id or `repo:file`) at `scale`, beside the
        weights at runtime (never baked into quantized ones). Returns the prepared `LoRA`."""
        from .adapters.apply import prepare
        from .adapters.source import read_lora

        file = read_lora(source, revision=revision)
        networks = self._lora_networks(load=True)
        absent = {}
        if not self.use_t5:
            absent["t5"] = "this pipeline runs without T5 (T5-drop mode)"
        elif self.stream_t5:
            absent["t5"] = "T5 is streamed block by block, which takes no LoRA; load it whole (no --stream-t5)"
        lora = prepare(file, {k: v for k, v in networks.items() if k not in absent}, name=name, scale=scale,
                       text_encoder_scale=text_encoder_scale, strict=strict, absent=absent)  # fmt: skip
        self._loras.add(lora, self._lora_networks())
        try:
            self._plan_loras()
        except InputError:
            self._loras.remove([lora.name], self._lora_networks())
            raise
        preset = lora_preset(file.path.name, file.source, file.sha256, self._base_variant or self.variant)
        if preset is not None:  # a distilling LoRA: its model card's settings become the defaults
            self._base_variant = self._base_variant or self.variant
            self.variant, lora.preset = preset, preset.name
            log.info("LoRA %s makes this %s: defaults now %d steps, cfg %g, shift %g, %s", lora.name,
                     preset.description, preset.steps, preset.cfg, preset.shift, preset.sampler)  # fmt: skip
        return lora

    def set_lora_scales(self, scales, text_encoder_scales=None) -> None:
        """{name: weight} (or one weight for all); `text_encoder_scales` likewise for CLIP/T5."""
        self._loras.set_scales(scales, self._lora_networks(), text_encoder_scales)

    def unload_lora(self, name=None) -> list:
        """Remove LoRA(s) by name (None: all) without reloading the base model."""
        removed = self._loras.remove([name] if isinstance(name, str) else name, self._lora_networks())
        self._plan_loras()
        if self._base_variant is not None and not any(lora.preset for lora in self.loras):
            self.variant, self._base_variant = self._base_variant, None  # the base model's defaults again
        return removed

    def _plan_loras(self) -> None:
        """Under a budget the plan also holds the LoRAs' factors (denoise: the transformer's,
        encode: the text encoders'); a LoRA they no longer fit with is refused."""
        if self._plan_without_loras is None:
            return
        from .memory import plan_fits

        extra = {"denoise": sum(lora.factor_bytes("transformer", self.dtype) for lora in self.loras),
                 "encode": sum(lora.factor_bytes(c, self.dtype) for lora in self.loras for c in TEXT_ENCODERS)}
        plan = self._plan_without_loras.holding(extra)
        if not plan_fits(plan, self.budget_bytes):
            raise InputError(
                f"the LoRAs' factors ({sum(extra.values()) / 1e6:.0f} MB) do not fit the {self.memory_budget:g} GB "
                f"memory plan ({plan.describe()}); raise --memory-budget, use fewer LoRAs, or fuse them into "
                "16-bit weights (python -m sd35_mlx.convert --lora FILE --fuse-lora)"
            )
        self.plan = plan

    @property
    def loras(self) -> list:
        return list(self._loras.loras.values())

    def _lora_networks(self, load: bool = False) -> Dict[str, Any]:
        transformer = self._load_transformer() if load else self._transformer
        enc = self._load_encoders() if load else self._encoders
        nets = {"transformer": transformer}
        for name in ("clip_l", "clip_g", "t5"):
            net = getattr(enc, name, None) if enc is not None else None
            nets[name] = net if isinstance(net, nn.Module) else None  # a streamed T5 takes no LoRA
        return nets

    def release(self, *names: str) -> None:
        """Drop networks (default: all) and return their memory to the system. ControlNets
        go with the transformer."""
        for n in names or ("transformer", "vae", "encoders"):
            setattr(self, f"_{n}", None)
            if n == "transformer":
                self._controlnets = {}
        mx.clear_cache()

    # ---- stages ----
    def settings_with_defaults(self, settings: GenerationSettings) -> GenerationSettings:
        """Fill unset fields from the variant's defaults and check the size fits the model."""
        v = self.variant
        width, height = settings.width, settings.height
        if settings.init_image is not None:  # img2img: a side not given follows the init image
            width, height = init_image_size(settings.init_image, width, height)
        s = replace(
            settings,
            width=width or v.default_size,
            height=height or v.default_size,
            steps=settings.steps or v.steps,
            cfg=v.cfg if settings.cfg is None else settings.cfg,
            sampler=settings.sampler or v.sampler,
            shift=settings.shift or v.shift,
        ).validate()
        validate_size(s.height, s.width, v)
        if not uses_cfg(s.cfg) and (s.negative_prompt or s.skip_layer_guidance is not None):
            # One conditional pass: neither has any effect, so neither is recorded as used.
            unused = " and ".join(n for n, on in (("the negative prompt", s.negative_prompt),
                                                  ("skip-layer guidance", s.skip_layer_guidance)) if on)  # fmt: skip
            log.warning("cfg %g ≤ 1 runs one conditional pass: %s is ignored (not recorded in the metadata)", s.cfg, unused)
            s = replace(s, negative_prompt="", skip_layer_guidance=None)
        if s.skip_layer_guidance is not None:
            s.skip_layer_guidance.check_depth(v.config.depth)
        return s

    def encode_prompt(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: Union[str, Sequence[str]] = "",
        *,
        t5_length: int = T5_DEFAULT_LENGTH,
        with_negative: bool = True,
        verbose: bool = False,
    ) -> PromptEmbeddings:
        """Run the text encoders. The negative prompt defaults to "" (encoded, not zeros).

        Prompt and negative go through each encoder as one batch; with `low_memory` each
        encoder is released as soon as it has run, so only one is ever in memory.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        texts = prompts + (negatives if with_negative else [])
        enc = self._load_encoders()
        tok = self.tokenizers
        outputs = {}
        with self._within_budget():
            for name, label, tokenizer in (("clip_l", "CLIP-L", tok.clip_l), ("clip_g", "CLIP-G", tok.clip_g)):
                batch = tokenizer.tokenize(texts)
                _report_truncation(label, batch)
                outputs[name] = getattr(enc, name)(mx.array(batch.ids))
                mx.eval(outputs[name])
                if self.low_memory:
                    setattr(enc, name, None)
            t5_hidden = None
            if self.use_t5:
                batch = tok.t5.tokenize(texts, max_length=t5_length)
                _report_truncation("T5", batch)
                t5_hidden = enc.t5(mx.array(batch.ids))
                mx.eval(t5_hidden)
        cond = assemble(outputs["clip_l"], outputs["clip_g"], t5_hidden, t5_length, joint_dim=self.context_dim)
        n = len(prompts)
        positive = Conditioning(cond.context[:n], cond.pooled[:n])
        negative = Conditioning(cond.context[n:], cond.pooled[n:]) if with_negative else None
        if self.low_memory:
            self.release("encoders")
        texts = dict(prompt=prompt, negative_prompt=negative_prompt if with_negative else None) if isinstance(prompt, str) else {}
        return PromptEmbeddings(positive, negative, t5_length, not self.use_t5, **texts)

    @property
    def encode_tile(self) -> Optional[int]:
        """Pixels per tile side of VAE encodes: the memory plan's (`Plan.encode_tile`), else None (whole)."""
        return self.plan.encode_tile if self.plan is not None else None

    def encode_image(self, image: mx.array) -> mx.array:
        """(B, H, W, 3) in [-1, 1] -> scaled latents (the distribution's mean: deterministic)."""
        from .models.vae_tiling import encode_mean

        vae = self._load_vae()
        with self._within_budget():
            mean = encode_mean(vae, image.astype(self.dtype), self.encode_tile)
            latents = vae.to_latents(mean.astype(mx.float32))
            mx.eval(latents)
        return latents

    def generate_latents(
        self,
        settings: GenerationSettings,
        *,
        embeddings: Optional[PromptEmbeddings] = None,
        noise: Optional[mx.array] = None,
        verbose: bool = False,
        cfg_exchange=None,
    ) -> Iterator[StepInfo]:
        """Yield a `StepInfo` after every denoising step; the last one holds the final latents.

        Stop iterating at any time to cancel. `noise` overrides the seeded initial noise.
        cfg_exchange (`distributed.CFGExchange`): CFG-parallel over 2 ranks, both of which
        call this with the same settings (docs/distributed.md).
        """
        s = self.settings_with_defaults(settings).with_seed()
        self._prepare_kept_loaded_limit(s.height, s.width, s.t5_length)
        control = ControlSession.open(self, s)  # ControlNets recognised and checked; no weights read
        encodes_init_image = s.init_image is not None and not (control and control.inpainting_controlnet)
        if encodes_init_image:
            self._plan_init_image()
        use_cfg = uses_cfg(s.cfg)  # cfg ≤ 1: one conditional pass (Turbo), never neg + 0·(pos − neg)
        if cfg_exchange is not None:
            from .distributed import check_cfg_parallel

            check_cfg_parallel(cfg_exchange.ranks.size, s.cfg)
        if embeddings is None:
            t0 = time.perf_counter()
            embeddings = self.encode_prompt(
                s.prompt, s.negative_prompt, t5_length=s.t5_length, with_negative=use_cfg, verbose=verbose
            )
            self.timings["encode"] = time.perf_counter() - t0
        if use_cfg and embeddings.negative is None:
            raise InputError("these embeddings were encoded without a negative prompt but cfg > 1 needs one")

        h, w = s.height // 8, s.width // 8
        if noise is None:
            noise = initial_noise(s.seed, h, w, batch=embeddings.positive.context.shape[0])
        sigmas = flow_sigmas(s.steps, s.shift)
        latents = noise
        image_latents = None
        if encodes_init_image:
            t0 = time.perf_counter()  # (the pixels are not kept: only the latents stay until denoising ends)
            image_latents = self.encode_image(control.init_pixels(s) if control else load_image(s.init_image, s.width, s.height))
            if self.low_memory:
                self.release("vae")
            sigmas = img2img_sigmas(s.steps, s.strength, s.shift, s.img2img_rule)
            latents = scale_noise(image_latents, noise, float(sigmas[0]))
            self.timings["encode_image"] = time.perf_counter() - t0
        controlnets, blend = control.prepare(self, s, noise, image_latents) if control else ((), None)
        self.control_images = control.control_images if control else []  # what each ControlNet saw
        self.control_specs = [spec for _, spec in control.specs] if control else []  # as recognised
        self._control_session = control
        if control and self.low_memory:
            self.release("vae")

        # With low_memory the pipeline owns the transformer for this one generation, so it
        # may free the adaLN weights (precomputed for the whole schedule) and the full
        # position table (cropped once) while denoising; it is reloaded lazily next time.
        with self._within_budget():
            denoiser = Denoiser(
                self._load_transformer(), embeddings.positive, embeddings.negative if use_cfg else None,
                cfg=s.cfg, skip_layer_guidance=s.skip_layer_guidance, num_steps=len(sigmas) - 1,
                sigmas=sigmas, free_adaln=self.low_memory, free_pos_embed=self.low_memory,
                split_cfg=self.plan is not None and self.plan.split_cfg,  # half the activations, when the plan needs it
                dequantize_per_block=self._dequantizes_per_block(),
                slg_steps=s.steps if s.init_image is not None and s.img2img_rule == "stability" else None,
                controlnets=controlnets,
                cfg_exchange=cfg_exchange,
            )  # fmt: skip
        sampler = make_sampler(s.sampler, sigmas)
        t0 = time.perf_counter()
        # inpainting: the known region back, noised to the next sigma (part of each step)
        after_step = (lambda i, x: blend.apply(x, sigmas[i + 1])) if blend is not None else None
        # The next step is queued while one runs; MLX's memory limit holds that queued work too
        # (evaluation waits at the limit). One limit for every step, taken before the first
        # (H200, kept loaded, Medium 1024²: a limit taken at each step rose with the queued
        # step, peak 34.9 GB against 29.7 GB before queueing ahead).
        stage_limit = self._stage_limit_bytes()
        steps = denoiser.run(latents, sampler, range(len(sigmas) - 1), after_step, lambda: memory_limit(stage_limit))
        try:  # each step evaluates within the budget; the caller's code between steps runs unlimited
            for i, latents in steps:
                yield StepInfo(step=i + 1, total=len(sigmas) - 1, sigma=float(sigmas[i + 1]), latents=latents, seed=s.seed)
        finally:
            steps.close()  # a step queued ahead finishes before the transformer is released
            self.timings["denoise"] = time.perf_counter() - t0
            if self.low_memory:
                self.release("transformer")

    def decode(self, latents: mx.array) -> mx.array:
        """Scaled latents -> images (B, H, W, 3) in about [-1, 1]."""
        vae = self._load_vae()
        z = vae.from_latents(latents).astype(self.dtype)
        from .models.vae_tiling import decode_tiled, should_tile

        tile = self.tile_vae
        if tile is None:
            budget = self.budget_bytes or default_budget_bytes()
            tile = should_tile(latents.shape[1] * 8, latents.shape[2] * 8, budget)
        with self._within_budget():
            if tile and self.plan is not None and self.plan.decode_tile:
                images = decode_tiled(vae, z, tile=self.plan.decode_tile)
            else:
                images = decode_tiled(vae, z) if tile else vae.decode(z)
            mx.eval(images)
        return images.astype(mx.float32)

    def preview(self, latents: mx.array, upscale: int = 8):
        """A cheap RGB preview (PIL) of latents: a linear map measured once from the VAE."""
        from .preview import calibrate, latents_to_preview

        if self._preview_projection is None:
            vae_was_loaded = self._vae is not None
            self._preview_projection = calibrate(self._load_vae())
            mx.eval(self._preview_projection)
            if self.low_memory and not vae_was_loaded:
                self.release("vae")
        return latents_to_preview(latents, self._preview_projection, upscale)

    def metadata(self, s: GenerationSettings) -> Dict[str, Any]:
        meta = s.to_dict()
        meta.update(
            model=self.name,
            variant=self.variant.name,
            t5=("dropped" if not self.use_t5 else "t5xxl") + f":{s.t5_length}",
            quantization=quantization_text(self.quantization),
            dtype=dtype_name(self.dtype),
            sd35_mlx_version=__version__,
        )
        meta.update(control_metadata(s, self.controlnet_quantization, self.control_specs))
        if self._loras:
            meta["loras"] = self._loras.records()
        return meta

    def generate(
        self,
        prompt: Optional[str] = None,
        *,
        settings: Optional[GenerationSettings] = None,
        embeddings: Optional[PromptEmbeddings] = None,
        callback: Optional[StepCallback] = None,
        noise: Optional[mx.array] = None,
        verbose: bool = False,
        cfg_exchange=None,
        **overrides: Any,
    ) -> GeneratedImage:
        """Generate one image. Fields of `GenerationSettings` can be passed as keywords.
        cfg_exchange: CFG-parallel over 2 ranks (see `generate_latents`)."""
        s = settings or GenerationSettings()
        if prompt is not None:
            overrides["prompt"] = prompt
        if "skip_layer_guidance" in overrides and isinstance(overrides["skip_layer_guidance"], dict):
            overrides["skip_layer_guidance"] = SkipLayerGuidance(**overrides["skip_layer_guidance"])
        if embeddings is not None:  # record what was encoded (the images come from it), not the settings'
            known = {k: getattr(embeddings, k) for k in ("prompt", "negative_prompt", "t5_length")
                     if getattr(embeddings, k) is not None}  # fmt: skip
            for k, v in known.items():
                if k in overrides and overrides[k] != v:
                    log.warning("%s %r differs from the embeddings' (%r): the embeddings are used and recorded", k, overrides[k], v)
            overrides = {**overrides, **known}
        s = self.settings_with_defaults(replace(s, **overrides)).with_seed()
        final = None
        for info in self.generate_latents(s, embeddings=embeddings, noise=noise, verbose=verbose, cfg_exchange=cfg_exchange):
            final = info
            if callback is not None and callback(info) is False:
                raise GenerationInterrupted(f"stopped by the callback after step {info.step}/{info.total}")
        t0 = time.perf_counter()
        images = self.decode(final.latents)
        self.timings["decode"] = time.perf_counter() - t0
        if self.low_memory:
            self.release("vae")
        meta = self.metadata(s)
        image = to_pil(images)[0]
        if self._control_session is not None:  # inpainting a crop: pasted back into the original
            image = self._control_session.finish(image, s)
        return GeneratedImage(image=image, seed=s.seed, metadata=meta, latents=final.latents)


def initial_noise(seed: int, height: int, width: int, batch: int = 1, channels: int = 16) -> mx.array:
    """Standard normal latents from `seed`, drawn on the CPU so every backend gets the same."""
    return mx.random.normal(
        (batch, height, width, channels), dtype=mx.float32, key=mx.random.key(seed), stream=mx.cpu
    )


def _controlnet_quantization(text: Optional[str]) -> Optional[QuantSpec]:
    from .control.convert import parse_controlnet_quantize

    return parse_controlnet_quantize(text)


def _wanted(t5: bool) -> Tuple[str, ...]:
    return REQUIRED + (("t5",) if t5 else ())


def _budget_bytes(gb: float) -> int:
    """The API's budget (GB) in bytes, the unit used inside (NaN, inf and ≤ 0 refused)."""
    return int(positive_gb("memory_budget", gb) * 1e9)


def _report_truncation(name: str, batch) -> None:
    for line in batch.truncation_warnings(name):  # prompts first, then the negatives
        log.warning("%s", line)
