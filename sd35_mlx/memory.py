"""How much memory a generation needs, and a planner that makes it fit a budget.

Estimates come from the networks themselves (built lazily: MLX allocates nothing until
used), so they are exact for weights and hold for fine-tunes with other shapes. With
staged execution the peak is the largest stage, not the sum:

    encode  = the largest of CLIP-L, CLIP-G and T5 (they run one after another and each is
              released after use); T5 whole, or one block at a time when streamed
    denoise = transformer + activations (+ on CPU the attention score matrix, which MLX's
              CPU attention materialises); with `trimmed_transformer` the adaLN and
              timestep/pooled embedder weights (modulations precomputed for the schedule)
              and the uncropped position table are replaced by the modulation table and
              the crop
    decode  = VAE decoder + decode activations (tiled: one tile's worth)
    init_image = img2img and inpainting only: VAE encoder + an encode of the init image (in
              the decode's tiles when the VAE is tiled; the pipeline runs it after the text
              encoders, then releases the VAE); its latents (and an inpainting mask) are held
              from there until denoising ends
    control = with ControlNets only: VAE encoder + an encode of the control image, tiled as
              init_image (ControlSession.prepare runs it after init_image, then releases the VAE)

Stages run in the order encode, init_image, control, denoise, decode.

Activation constants depend on the device (`device`, default: MLX's default device): plan
for the machine that will run the generation.

Typed in, typed out: quantization is a `QuantSpec` per network (None: 16-bit), the T5 mode a
`T5Mode`, sizes are bytes (GB only in `Plan.describe` and messages).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .backend import cuda_available, on_cpu
from .components import T5_DEFAULT_LENGTH, T5Mode
from .config import CLIP_G, CLIP_L, SD3_VAE, T5_XXL, ControlNetConfig, MMDiTConfig, T5Config, VAEConfig
from .errors import InputError
from .models.vae_tiling import DEFAULT_DECODE_TILE
from .quantize import QuantSpec, make_spec

GB = 1e9
BYTES_16 = 2


def default_budget_bytes() -> int:
    """What this machine can give: Metal's recommended working set, else 85% of RAM."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    try:
        return int(0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * 10**9


# How far below a budget MLX's memory limit is set (see `memory_limit`): evaluation checks the
# limit as it commits work, so the peak passes it by up to one command buffer's temporaries.
# The margin is therefore one command buffer's size, read from MLX's own setting, not fitted
# to a card: MLX_MAX_MB_PER_BUFFER (the CLI sets 100 MB on Linux; measured on an H100: at
# most 0.06 GB over), else MLX CUDA's default (1000 MB on the H100 and H200; 0.25-0.42 GB
# over was measured there). Metal's command buffers hold 40-50 MB.
THROTTLE_MARGIN = int(0.1 * GB)  # the floor: also what a 100 MB buffer needs
CUDA_DEFAULT_BUFFER_MB = 1000
# Under a budget the limit is also held to the plan's estimated need plus this much room for
# queued GPU work, so the measured peak is the estimate (+10 %) rather than whatever part of a
# generous budget queued work would fill.
QUEUE_ROOM = 0.10


SMALL_COMMAND_BUFFERS = {"MLX_MAX_MB_PER_BUFFER": "100", "MLX_MAX_OPS_PER_BUFFER": "20"}


def use_small_command_buffers() -> None:
    """Small MLX command buffers (unless the environment says otherwise): the throttle's
    overshoot stays near 0.05 GB at the same speed (docs/memory.md). MLX reads these when it
    first uses the GPU: call before that."""
    for key, value in SMALL_COMMAND_BUFFERS.items():
        os.environ.setdefault(key, value)


def command_buffer_bytes() -> int:
    """The most one MLX command buffer may hold (MLX_MAX_MB_PER_BUFFER, else the backend's default)."""
    try:
        mb = int(os.environ.get("MLX_MAX_MB_PER_BUFFER", "0") or 0)
    except ValueError:
        mb = 0
    if mb <= 0:
        mb = CUDA_DEFAULT_BUFFER_MB if cuda_available() else 50
    return mb * 10**6


def throttle_margin() -> int:
    """One command buffer's temporaries (at least THROTTLE_MARGIN): how far past MLX's memory
    limit evaluation can go before it waits."""
    return max(THROTTLE_MARGIN, command_buffer_bytes())


def throttle_bytes(budget_bytes: int, largest_op_bytes: int = 0) -> int:
    """The MLX memory limit that keeps a generation within `budget_bytes`: the margin, and
    room for the largest single allocation of the run (`Plan.headroom`), which can land past
    the limit before evaluation checks it (H100: peaks 0.09-0.15 GB over with 0.11-0.17 GB
    MLP activations at CFG batch 2, 0.04-0.06 GB at batch 1)."""
    return max(budget_bytes - throttle_margin() - largest_op_bytes, budget_bytes // 2)


def budget_limit(budget_bytes: int, plan: Optional["Plan"] = None) -> int:
    """MLX's memory limit while a stage runs under a budget: `throttle_bytes(budget,
    plan.headroom)`, held to the plan's estimated need + QUEUE_ROOM (the rest of a large
    budget would only fill with queued work, and the estimate would stop describing the peak)."""
    limit = throttle_bytes(budget_bytes, plan.headroom if plan is not None else 0)
    if plan is None:
        return limit
    return min(limit, int(plan.peak * (1 + QUEUE_ROOM)))


def room_above_limit(budget_bytes: int, plan: Optional["Plan"] = None) -> int:
    """Bytes between a stage's memory limit (`budget_limit`) and the budget's throttle: what one
    allocation may land past the limit (MLX checks it before an operation allocates) and the
    budget still holds."""
    return throttle_bytes(budget_bytes, plan.headroom if plan is not None else 0) - budget_limit(budget_bytes, plan)


def dequantizes_per_block(budget_bytes: Optional[int], plan: Optional["Plan"], dense_block: int) -> bool:
    """Whether a quantized block's layers may share one de-quantization (the Denoiser's
    `dequantize_per_block`, `dense_block` bytes in one allocation): always without a budget;
    under one only where that allocation fits between the stage's memory limit and the
    budget's throttle, since MLX checks its limit before an operation allocates."""
    if not budget_bytes:
        return True
    return dense_block <= room_above_limit(budget_bytes, plan)


def expected_peak(budget_bytes: int, plan: "Plan") -> int:
    """The peak a generation under `budget_bytes` is expected to reach with this plan: the
    largest stage's need, the denoise stage's with the step queued ahead beside it. Where that
    passes the stage's memory limit (`budget_limit`), evaluation waits at the limit and one
    allocation can land past it, the largest the step makes: the MLP activation
    (`plan.headroom`), or a quantized block's 16-bit weights when it de-quantizes them at once."""
    limit = budget_limit(budget_bytes, plan)
    shared = plan.dense_block if dequantizes_per_block(budget_bytes, plan, plan.dense_block) else 0
    past_limit = limit + max(plan.headroom, shared)
    peaks = [need + (plan.queued_step if stage == "denoise" else 0) for stage, need in plan.stages.items()]
    return max(peak if peak <= limit else past_limit for peak in peaks)


@contextmanager
def memory_limit(limit_bytes: Optional[int]) -> Iterator[None]:
    """Hold MLX to `limit_bytes` inside the block (None: leave it alone), then restore.

    MLX's GPU backends free an operation's inputs only once its command buffer has run, and
    evaluation queues up to 10 buffers ahead, so without a limit a transformer step keeps the
    temporaries of many layers (dequantized weights, activations) alive at once: 1-10 GB on
    an H100. Past the limit, evaluation waits for queued work to finish before adding more.
    """
    if limit_bytes is None:
        yield
        return
    previous = mx.set_memory_limit(int(limit_bytes))
    try:
        yield
    finally:
        mx.set_memory_limit(previous)


def _quantized_linear_bytes(weight_elements: int, bits: int, group_size: int) -> int:
    """A Linear weight at `bits` (affine): packed weights plus a 16-bit scale and bias per group."""
    return int(weight_elements * bits / 8 + (weight_elements // group_size) * 2 * BYTES_16)


def quantized_paths_for(model: nn.Module, bits: Optional[int], group_size: int = 64, component: str = "") -> set:
    """Module paths quantized at `bits` (the component's keep list applies when named)."""
    if not bits:
        return set()
    from .quantize import quantizable_layers

    if component:
        return set(quantizable_layers(model, make_spec(component, bits=bits, group_size=group_size)))
    return {p for p, m in model.named_modules() if type(m) is nn.Linear and m.weight.shape[1] % group_size == 0}


def network_bytes(model: nn.Module, bits: Optional[int] = None, group_size: int = 64, component: str = "",
                  where: Optional[str] = None) -> int:  # fmt: skip
    """Bytes of a network's weights at 16-bit, or with its Linear layers at `bits`.

    `where`: only parameters whose path starts with this text or has it after a dot
    (e.g. "adaLN", "blocks.0.", "t_embedder." but not "context_embedder").
    """
    quantized = quantized_paths_for(model, bits, group_size, component)
    total = 0
    for key, p in tree_flatten(model.parameters()):
        if where is not None and not (key.startswith(where) or "." + where in key):
            continue
        module, _, name = key.rpartition(".")
        if module in quantized and name == "weight":
            total += _quantized_linear_bytes(p.size, bits, group_size)  # type: ignore[arg-type]
        else:
            total += p.size * BYTES_16
    return total


def _bits(spec: Optional[QuantSpec]) -> Optional[int]:
    return spec.bits if spec is not None else None


@dataclass(frozen=True)
class Plan:
    """What was chosen and the estimated need of each stage (bytes)."""

    transformer_spec: Optional[QuantSpec]  # None: 16-bit
    t5_spec: Optional[QuantSpec]  # None: 16-bit (or dropped)
    t5: T5Mode
    tile_vae: bool
    stages: Dict[str, int] = field(default_factory=dict)
    decode_tile: Optional[int] = None  # latents per tile side when tiled
    split_cfg: bool = False  # CFG as two batch-1 passes (slower; half the step's activations)
    headroom: int = 0  # the largest single allocation (the denoise step's MLP activation), bytes
    # a quantized transformer block's 16-bit weights, which the denoise step's shared
    # de-quantization allocates at once (0 at 16-bit); see `dequantizes_per_block`
    dense_block: int = 0
    # the denoise step queued ahead while one runs (`Denoiser.run`): its activations, alive
    # beside the running step's, as far as the stage's memory limit lets them
    queued_step: int = 0

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    @property
    def transformer_bits(self) -> Optional[int]:
        return _bits(self.transformer_spec)

    @property
    def t5_bits(self) -> Optional[int]:
        return _bits(self.t5_spec)

    @property
    def encode_tile(self) -> Optional[int]:
        """Pixels per tile side of the VAE encodes (init image, control image): the decode's
        tiles when the plan tiles the VAE, else None (whole)."""
        return self.decode_tile * 8 if self.tile_vae and self.decode_tile else None

    def quantization(self) -> Dict[str, Optional[QuantSpec]]:
        """The chosen specs: the transformer's, and T5's unless it is dropped."""
        out = {"transformer": self.transformer_spec}
        if self.t5 != T5Mode.DROPPED:
            out["t5"] = self.t5_spec
        return out

    def holding(self, extra: Mapping[str, int]) -> "Plan":
        """This plan with `extra` bytes (stage -> bytes) more in those stages (e.g. the
        factors of runtime LoRAs on the networks of a stage)."""
        return replace(self, stages={k: v + int(extra.get(k, 0)) for k, v in self.stages.items()})

    def describe(self) -> str:
        tr = self.transformer_spec.label if self.transformer_spec else "16-bit"
        t5 = "dropped" if self.t5 == T5Mode.DROPPED else f"{self.t5_spec.label if self.t5_spec else '16-bit'}, {self.t5}"
        stages = ", ".join(f"{k} {v / GB:.2f} GB" for k, v in self.stages.items())
        vae = f"tiled ({self.decode_tile * 8} px tiles)" if self.tile_vae and self.decode_tile else (
            "tiled" if self.tile_vae else "untiled")  # fmt: skip
        cfg = "; CFG as two passes" if self.split_cfg else ""
        return f"transformer {tr}; T5 {t5}; VAE {vae}{cfg} (estimated need: {stages})"


class MemoryEstimator:
    """Per-stage memory of one model family at a given image size.

    device: where the generation runs (activation sizes differ: MLX's CPU attention and
        convolutions materialise much more than the Metal kernels). Default: MLX's default.
    trimmed_transformer: the denoiser precomputes every step's modulations (a table of
        steps x batch x chunks x hidden) and frees the adaLN and timestep/pooled embedder
        weights, and keeps only the cropped position table (`Denoiser(free_adaln=True,
        free_pos_embed=True)`). Leave False unless the pipeline does both.
    init_image: the generation starts from an init image (img2img, inpainting), which is
        VAE-encoded after the text encoders: its own stage, `init_image`.
    """

    def __init__(self, mmdit: MMDiTConfig, t5: T5Config = T5_XXL, vae: VAEConfig = SD3_VAE,
                 clip_l=CLIP_L, clip_g=CLIP_G, *, device: Optional[mx.Device] = None,
                 trimmed_transformer: bool = False, split_cfg: bool = False,
                 controlnets: Sequence[Tuple[ControlNetConfig, Optional[QuantSpec]]] = (),
                 init_image: bool = False):  # fmt: skip
        from .models.clip import CLIPTextEncoder
        from .models.mmdit import MMDiT
        from .models.t5 import T5Encoder
        from .models.vae import VAE

        self.mmdit_config, self.vae_config = mmdit, vae
        self.device = device or mx.default_device()
        self.trimmed_transformer = trimmed_transformer
        self.split_cfg = split_cfg  # CFG may run as two batch-1 passes: one pass's activations alive
        self.init_image = init_image
        self.transformer = MMDiT(mmdit)  # lazy: nothing is allocated
        self.t5 = T5Encoder(t5)
        self.clips = [CLIPTextEncoder(clip_l), CLIPTextEncoder(clip_g)]
        self.vae = VAE(vae)
        from .models.controlnet import ControlNet

        # ControlNets load and are released with the transformer: they count in the denoise stage
        self.controlnets = [(ControlNet(cfg), spec) for cfg, spec in controlnets]
        self._cache: Dict[Tuple, int] = {}

    @property
    def on_cpu(self) -> bool:
        return on_cpu(self.device)

    def _bytes(self, name: str, model: nn.Module, spec: Optional[QuantSpec], where: Optional[str] = None) -> int:
        # the spec's bits and group size, with the component's default keep list
        key = (name, _bits(spec), spec.group_size if spec else None, where)
        if key not in self._cache:
            group = spec.group_size if spec else 64
            self._cache[key] = network_bytes(model, _bits(spec), group, component=name, where=where)
        return self._cache[key]

    def t5_streamed(self, spec: Optional[QuantSpec]) -> int:
        """Peak weights of streamed T5: the stem (embedding table) or one block, whichever is
        larger. A block is read at 16-bit (q, k, v and their fused copy coexist for a moment)
        and, with `spec`, quantized on the fly (a converted 4-bit folder needs less)."""
        stem = sum(p.size * BYTES_16 for k, p in tree_flatten(self.t5.parameters()) if not k.startswith("blocks."))
        block16 = self._bytes("t5", self.t5, None, "blocks.0.")
        qkv16 = self._bytes("t5", self.t5, None, "blocks.0.attn.qkv")
        block = block16 + qkv16 + (self._bytes("t5", self.t5, spec, "blocks.0.") if spec else 0)
        return max(stem, block)

    def encode(self, t5_spec: Optional[QuantSpec], t5_mode: T5Mode) -> int:
        """Encoders run one after another and each is released after use: the largest counts."""
        sizes = [self._bytes(n, m, None) for n, m in zip(("clip_l", "clip_g"), self.clips)]
        if t5_mode == T5Mode.LOADED:
            sizes.append(self._bytes("t5", self.t5, t5_spec))
        elif t5_mode == T5Mode.STREAMED:
            sizes.append(self.t5_streamed(t5_spec))
        return max(sizes) + int(0.1 * GB)  # activations (T5 at 256 tokens: ~0.1 GB)

    def conditioning_bytes(self, spec: Optional[QuantSpec]) -> int:
        """Weights only the modulations need: every adaLN and the timestep/pooled embedders."""
        return sum(self._bytes("transformer", self.transformer, spec, part)
                   for part in ("adaLN", "t_embedder.", "y_embedder."))  # fmt: skip

    def modulation_table_bytes(self, steps: int, batch: int = 2) -> int:
        """The precomputed modulations: steps x batch x chunks x hidden at 16-bit."""
        chunks = sum(b.x.num_chunks + b.context.num_chunks for b in self.transformer.blocks) + 2
        return steps * batch * chunks * self.mmdit_config.hidden_size * BYTES_16

    @staticmethod
    def _tokens(height: int, width: int, t5_tokens: int) -> int:
        """Image patches (2x2 latents) plus CLIP's 77 and T5's tokens (T5-drop zeros count too)."""
        return (height // 16) * (width // 16) + 77 + t5_tokens

    def largest_step_allocation(self, height: int, width: int, t5_tokens: int, batch: int) -> int:
        """The denoise step's largest single tensor: the MLP activation, batch x tokens x 4H at 16-bit."""
        c = self.mmdit_config
        return batch * self._tokens(height, width, t5_tokens) * c.mlp_ratio * c.hidden_size * BYTES_16

    def step_activation_bytes(self, height: int, width: int, t5_tokens: int, batch: int) -> int:
        """What one denoise step allocates above the weights."""
        c = self.mmdit_config
        tokens = self._tokens(height, width, t5_tokens)
        if self.on_cpu:
            # residual streams, qkv, attention output and the 4x MLP intermediate of one block,
            # plus MLX's CPU attention, which builds the (tokens x tokens) scores per head
            activations = batch * tokens * c.hidden_size * BYTES_16 * 16
            return int(activations + batch * c.num_heads * tokens * tokens * BYTES_16)
        # What a step itself needs, measured on an H100 with every queued buffer waited for
        # (bench_memory --throttle floor: Medium 0.35 GB, Large 0.52 GB above the weights at
        # 1024², batch 1). Queued work beyond that is held to the budget by `memory_limit`.
        return int(batch * tokens * c.hidden_size * GPU_STEP_BYTES_PER_TOKEN_WIDTH)

    def denoise(self, spec: Optional[QuantSpec], height: int, width: int, t5_tokens: int, batch: int = 2,
                steps: int = 50) -> int:  # fmt: skip
        c = self.mmdit_config
        weights = self._bytes("transformer", self.transformer, spec)
        grid = (height // 16) * (width // 16)
        if self.trimmed_transformer:  # `steps`: the modulation table's length
            weights -= self.conditioning_bytes(spec)
            weights -= c.pos_embed_max_size**2 * c.hidden_size * BYTES_16  # the stored table
            weights += grid * c.hidden_size * BYTES_16  # its crop
            weights += self.modulation_table_bytes(steps, batch)
        activations = self.step_activation_bytes(height, width, t5_tokens, batch)
        need = weights + activations + self.controlnet_bytes(height, width, batch)
        if self.trimmed_transformer:
            # Before a step can run, the Denoiser reads the adaLN weights (for the modulation
            # table) and the whole position table (for its crop), then frees both: only the
            # larger of that moment and the step counts (it sets the peak of shallow models).
            setup = self.conditioning_bytes(spec) + c.pos_embed_max_size**2 * c.hidden_size * BYTES_16
            need = max(need, setup)
        return int(need)

    def dense_block_bytes(self, spec: Optional[QuantSpec]) -> int:
        """A block's quantized forward layers at 16-bit (the Denoiser's shared de-quantization
        holds them at once; `MMDiT.block_dense_bytes` of the loaded network): 0 at 16-bit."""
        if spec is None:
            return 0
        key = ("dense_block", spec.bits, spec.group_size)  # plan_memory asks once per candidate
        if key not in self._cache:
            quantized = quantized_paths_for(self.transformer, spec.bits, spec.group_size, "transformer")
            per_block: Dict[str, int] = {}
            for path, p in tree_flatten(self.transformer.parameters()):
                module, _, name = path.rpartition(".")
                parts = module.split(".")
                if module in quantized and name == "weight" and parts[0] == "blocks" and "adaLN" not in parts:
                    per_block[parts[1]] = per_block.get(parts[1], 0) + p.size * BYTES_16
            self._cache[key] = max(per_block.values(), default=0)
        return self._cache[key]

    def controlnet_bytes(self, height: int, width: int, batch: int) -> int:
        """The ControlNets' weights, their control latents, the residuals a step holds (one
        (batch, patches, hidden) tensor per ControlNet block) at 16-bit, and the copy of one
        block's weights its matmuls read: float32 on the CPU (`cpu_compute`), de-quantized
        16-bit on a GPU for a quantized ControlNet (`fast_quantized`). That copy coexists with
        the transformer's own (CPU, one SD3.5 Large ControlNet block at 4-bit, 256²: the step
        needs 0.33 GB more than without it, of which weights and residuals are 0.10 GB)."""
        grid = (height // 16) * (width // 16)
        total = 0
        for net, spec in self.controlnets:
            cfg = net.config
            total += network_bytes(net, _bits(spec), spec.group_size if spec else 64, component="controlnet")
            total += (cfg.depth + 1) * batch * grid * cfg.hidden_size * BYTES_16
            total += (height // 8) * (width // 8) * cfg.control_channels * 4
            per_element = 4 if self.on_cpu else (BYTES_16 if spec is not None else 0)
            total += per_element * sum(p.size for _, p in tree_flatten(net.blocks[0].parameters()))
        return total

    def image_encode(self, height: int, width: int, tile: Optional[int] = None) -> int:
        """One VAE encode of a height x width image (the init image's, the control image's),
        whole or in `tile`-pixel tiles (when the plan tiles the VAE): the encoder's weights, the
        pixels (float32 and their 16-bit copy) and the encode's activations (a ControlNet's
        weights are read later, in the denoise stage)."""
        from .models.vae_tiling import encode_activation_bytes

        encoder = sum(p.size * BYTES_16 for k, p in tree_flatten(self.vae.parameters()) if k.startswith("encoder."))
        pixels = height * width * 3 * (4 + BYTES_16)
        h, w = (min(height, tile), min(width, tile)) if tile else (height, width)
        return encoder + pixels + encode_activation_bytes(h, w, self.vae_config, device=self.device)

    def init_latents_bytes(self, height: int, width: int) -> int:
        """What an init image leaves resident until denoising ends: its latents and an
        inpainting mask's (1 channel), float32 (counted whether or not a mask is used)."""
        return (height // 8) * (width // 8) * (self.vae_config.latent_channels + 1) * 4

    def decode(self, height: int, width: int, tiled, tile_latents: Optional[int] = None) -> int:
        from .models.vae_tiling import DEFAULT_DECODE_TILE, decode_activation_bytes

        decoder = sum(p.size * BYTES_16 for k, p in tree_flatten(self.vae.parameters()) if not k.startswith("encoder"))
        tile = (tile_latents or DEFAULT_DECODE_TILE) * 8  # pixels
        h, w = (min(height, tile), min(width, tile)) if tiled else (height, width)
        return decoder + decode_activation_bytes(h, w, self.vae_config, device=self.device)

    def plan(self, transformer: Optional[QuantSpec], t5: Optional[QuantSpec], t5_mode: T5Mode, tile: bool,
             height: int, width: int, t5_tokens: int, tile_latents: Optional[int] = None,
             split_cfg: Optional[bool] = None) -> Plan:  # fmt: skip
        """The estimate of one setting. split_cfg: None = as the estimator allows (`self.split_cfg`)."""
        t5_mode = T5Mode(t5_mode)
        split = self.split_cfg if split_cfg is None else split_cfg
        batch = 1 if split else 2
        held = self.init_latents_bytes(height, width) if self.init_image else 0
        decode_tile = (tile_latents or DEFAULT_DECODE_TILE) if tile else None
        encode_tile = decode_tile * 8 if decode_tile else None  # as Plan.encode_tile: a tiled VAE encodes in tiles too
        stages = {"encode": self.encode(t5, t5_mode)}  # the stages run in this order
        if self.init_image:
            stages["init_image"] = self.image_encode(height, width, encode_tile)
        if self.controlnets:
            stages["control"] = self.image_encode(height, width, encode_tile) + held
        stages["denoise"] = self.denoise(transformer, height, width, t5_tokens, batch=batch) + held
        stages["decode"] = self.decode(height, width, tile, tile_latents)
        return Plan(transformer, t5 if t5_mode != T5Mode.DROPPED else None, t5_mode, tile, stages, decode_tile, split,
                    self.largest_step_allocation(height, width, t5_tokens, batch), self.dense_block_bytes(transformer),
                    self.step_activation_bytes(height, width, t5_tokens, batch))


def candidates(allow_drop_t5: bool = True, fixed: Optional[Mapping[str, Optional[QuantSpec]]] = None,
               t5_mode: Optional[T5Mode] = None):  # fmt: skip
    """Settings (transformer spec, T5 spec, T5 mode) from best to smallest memory.

    Loaded T5 is quantized first (fast); below that T5 is streamed. Streamed T5 stays 16-bit:
    a block is read at 16-bit anyway, so quantizing it on the fly would only cost accuracy
    and time (a `fixed` T5 setting, e.g. a converted 4-bit T5, is kept). Dropping T5 comes
    last; with streaming it saves no memory (CLIP-G is the largest encoder), only time.

    `fixed` specs (what the user named, or how a converted folder stores a network) keep
    the rungs whose bits match, with the fixed spec itself in them. A fixed `t5_mode` keeps
    only its rungs (dropped: the transformer's ladder without T5).
    """
    fixed = dict(fixed or {})
    L, S, D = T5Mode.LOADED, T5Mode.STREAMED, T5Mode.DROPPED
    order = [(None, None, L), (None, 8, L), (None, 4, L), (None, "fixed", S), (8, "fixed", S), (4, "fixed", S)]
    if t5_mode == D:
        order = [(None, None, D), (8, None, D), (4, None, D)]
    elif t5_mode is not None:
        order = [rung for rung in order if rung[2] == t5_mode]
    elif allow_drop_t5:
        order.append((4, None, D))
    for tr_bits, t5_bits, mode in order:
        tr = make_spec("transformer", tr_bits) if tr_bits else None
        t5 = fixed.get("t5") if t5_bits == "fixed" else (make_spec("t5", t5_bits) if t5_bits else None)
        if "transformer" in fixed:
            if tr_bits != _bits(fixed["transformer"]):
                continue
            tr = fixed["transformer"]
        if "t5" in fixed and mode != D:
            if _bits(t5) != _bits(fixed["t5"]):
                continue
            t5 = fixed["t5"]
        yield tr, t5, mode


# Denoise-step memory above the weights on a GPU, bytes per token x hidden x batch
# (MemoryEstimator.denoise): about 25 live 16-bit tensors of the hidden width.
GPU_STEP_BYTES_PER_TOKEN_WIDTH = 52.0

# Decode tile sides (latents) tried in order, largest (fewest seams, fastest) first.
DECODE_TILES = (64, 32)  # 512 and 256 px: the sizes measured in docs/benchmarks.md


def plan_fits(plan: Plan, budget_bytes: int) -> bool:
    """The planner's rule: the largest stage fits under the memory limit the pipeline then
    sets (`throttle_bytes`); the rest of the budget is room for queued GPU work."""
    return plan.peak <= throttle_bytes(budget_bytes, plan.headroom)


def plan_memory(
    estimator: MemoryEstimator,
    budget_bytes: int,
    height: int,
    width: int,
    *,
    t5_tokens: int = T5_DEFAULT_LENGTH,
    allow_drop_t5: bool = True,
    fixed: Optional[Mapping[str, Optional[QuantSpec]]] = None,
    t5_mode: Optional[T5Mode] = None,
) -> Plan:
    """The best-quality settings whose estimated need fits `budget_bytes`, else InputError.

    A plan fits when its largest stage fits under `throttle_bytes(budget_bytes, plan.headroom)`, the memory
    limit the pipeline then sets: the rest of the budget is room for queued GPU work (speed).
    Within each rung CFG runs as one batch of 2 if that fits, else (when the estimator allows
    it) as two batch-1 passes. `fixed` / `t5_mode`: settings that are not the planner's to
    choose (see `candidates`).
    """
    tried: List[Plan] = []
    splits = (False, True) if estimator.split_cfg else (False,)  # CFG in one pass is faster: tried first
    for tr, t5, mode in candidates(allow_drop_t5, fixed, t5_mode):
        for split in splits:
            for tile, tile_latents in ((False, None),) + tuple((True, t) for t in DECODE_TILES):
                p = estimator.plan(tr, t5, mode, tile, height, width, t5_tokens, tile_latents, split)
                tried.append(p)
                if plan_fits(p, budget_bytes):
                    return p
    raise _nothing_fits(min(tried, key=lambda p: p.peak), "the smallest plan", budget_bytes, height, width)


def plan_with(estimator: MemoryEstimator, plan: Plan, budget_bytes: int, height: int, width: int,
              t5_tokens: int = T5_DEFAULT_LENGTH) -> Plan:  # fmt: skip
    """`plan`'s choices estimated again by `estimator` (e.g. one that now counts an init
    image, `init_image=True`), or InputError naming the stage when they no longer fit."""
    p = estimator.plan(plan.transformer_spec, plan.t5_spec, plan.t5, plan.tile_vae, height, width, t5_tokens,
                       plan.decode_tile, plan.split_cfg)  # fmt: skip
    if not plan_fits(p, budget_bytes):
        raise _nothing_fits(p, "the plan", budget_bytes, height, width)
    return p


def _nothing_fits(plan: Plan, which: str, budget_bytes: int, height: int, width: int) -> InputError:
    stage = max(plan.stages, key=plan.stages.get)
    return InputError(
        f"nothing fits a {budget_bytes / GB:.2f} GB budget at {width}x{height}: {which} "
        f"({plan.describe()}) needs about {(plan.peak + throttle_margin() + plan.headroom) / GB:.2f} GB, most of it in the "
        f"{stage} stage. {_ADVICE[stage]} Or raise --memory-budget."
        + (f" {throttle_margin() / GB:.1f} GB of that is room for one MLX command buffer: set "
           "MLX_MAX_MB_PER_BUFFER=100 MLX_MAX_OPS_PER_BUFFER=20 before MLX first uses the GPU "
           "(memory.use_small_command_buffers(); the CLI does) to need only 0.1 GB."
           if throttle_margin() > THROTTLE_MARGIN else "")
    )


_ADVICE = {
    "encode": "The text encoders set the floor (CLIP-G alone is 1.39 GB at 16-bit).",
    "init_image": "Use a smaller image (the init image is VAE-encoded at the image size, in tiles when the VAE is).",
    "control": "Use a smaller image (the control image is VAE-encoded at the image size, in tiles when the VAE is).",
    "denoise": "Use a smaller image (the transformer's activations grow with the pixel count).",
    "decode": "Use a smaller image (the VAE decodes one 512x512 tile at a time already).",
}


def own_need_bytes(estimator: "MemoryEstimator", height: int, width: int, t5_tokens: int = 256) -> int:
    """The largest stage's need above its own weights at this size (activations and
    temporaries of the encoders, a CFG-batch denoise step, an untiled decode): what a pipeline
    that keeps every network loaded needs on top of what is resident (see SD35Pipeline's
    kept-loaded memory limit)."""
    encode = estimator.encode(None, T5Mode.DROPPED) - max(estimator._bytes(n, m, None) for n, m in
                                                     zip(("clip_l", "clip_g"), estimator.clips))  # fmt: skip
    if estimator.trimmed_transformer:
        raise InputError("own_need_bytes describes a kept-loaded pipeline: use an estimator with trimmed_transformer=False")
    denoise = estimator.denoise(None, height, width, t5_tokens) - estimator._bytes("transformer", estimator.transformer, None)
    decoder = sum(p.size * BYTES_16 for k, p in tree_flatten(estimator.vae.parameters()) if not k.startswith("encoder"))
    decode = estimator.decode(height, width, tiled=False) - decoder
    return int(max(encode, denoise, decode))
