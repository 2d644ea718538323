"""The memory planner: exact weight sizes, stage estimates, and the plans it picks.

Weight sizes are checked two independent ways: against the parameter counts of the spec
(computed from the official key tables; docs/transformer.md lists the parameter counts) and against the bytes of the real networks
quantized by `quantize_network` (built lazily: shapes and dtypes only, nothing allocated).
Plans are computed for Apple-silicon GPUs (the target) whatever machine runs the tests.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from sd35_mlx.config import CLIP_G, CLIP_L, SD3_VAE, SD35_LARGE_MMDIT, SD35_MEDIUM_MMDIT, T5_XXL, T5Config
from sd35_mlx.errors import InputError
from sd35_mlx.memory import (
    DECODE_TILES,
    GB, THROTTLE_MARGIN, MemoryEstimator, candidates, default_budget_bytes, memory_limit, throttle_bytes,
    throttle_margin, network_bytes, plan_memory,
)  # fmt: skip
from sd35_mlx.models.clip import CLIPTextEncoder
from sd35_mlx.models.mmdit import MMDiT
from sd35_mlx.models.t5 import T5Encoder
from sd35_mlx.models.vae import VAE
from sd35_mlx.components import T5Mode
from sd35_mlx.quantize import make_spec, quantize_network

GPU = mx.Device(mx.DeviceType.gpu)
TR_4, T5_4 = make_spec("transformer", 4), make_spec("t5", 4)
CPU = mx.Device(mx.DeviceType.cpu)


@pytest.fixture(scope="module")
def medium() -> MemoryEstimator:
    return MemoryEstimator(SD35_MEDIUM_MMDIT, device=GPU, trimmed_transformer=True, split_cfg=True)  # as the pipeline


@pytest.fixture(scope="module")
def large() -> MemoryEstimator:
    return MemoryEstimator(SD35_LARGE_MMDIT, device=GPU, trimmed_transformer=True, split_cfg=True)


def stored_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def lazily_quantized(model: nn.Module, component: str, bits: int) -> nn.Module:
    """The network as the pipeline makes it: bf16, then quantize_network (all lazy)."""
    model.set_dtype(mx.bfloat16)
    return quantize_network(model, make_spec(component, bits), component)


# ---- weights -------------------------------------------------------------------------------------------
# Parameter counts from the official key tables (docs/transformer.md; corroborated by the hub's index sizes).
SPEC_PARAMETERS = [
    ("t5", lambda: T5Encoder(T5_XXL), 4_762_310_656),
    ("transformer", lambda: MMDiT(SD35_MEDIUM_MMDIT), 2_469_663_936),
    ("transformer", lambda: MMDiT(SD35_LARGE_MMDIT), 8_146_280_768),
    ("clip_l", lambda: CLIPTextEncoder(CLIP_L), 123_650_304),
    ("clip_g", lambda: CLIPTextEncoder(CLIP_G), 694_659_840),
    ("vae", lambda: VAE(SD3_VAE), 83_819_683),
]


@pytest.mark.parametrize("component, build, params", SPEC_PARAMETERS, ids=[
    "t5", "medium", "large", "clip_l", "clip_g", "vae"])  # fmt: skip
def test_16bit_bytes_are_twice_the_spec_parameter_count(component, build, params):
    assert network_bytes(build()) == 2 * params


@pytest.mark.parametrize(
    "build, bits, component, spec_gb",
    [
        (lambda: T5Encoder(T5_XXL), 4, "t5", 2.87),
        (lambda: T5Encoder(T5_XXL), 8, "t5", 5.18),
        (lambda: MMDiT(SD35_MEDIUM_MMDIT), 4, "", 1.72),
        (lambda: MMDiT(SD35_MEDIUM_MMDIT), 8, "", 2.84),
        (lambda: MMDiT(SD35_LARGE_MMDIT), 4, "", 4.72),
        (lambda: MMDiT(SD35_LARGE_MMDIT), 8, "", 8.74),
        (lambda: MMDiT(SD35_LARGE_MMDIT), None, "", 16.29),
        (lambda: CLIPTextEncoder(CLIP_G), None, "", 1.39),
    ],
    ids=["t5-4", "t5-8", "medium-4", "medium-8", "large-4", "large-8", "large-16", "clip_g-16"],
)
def test_bytes_match_spec_table(build, bits, component, spec_gb):
    """Every Linear quantized (gs 64, 16-bit scale and bias per group), the rest 16-bit."""
    assert round(network_bytes(build(), bits, component=component) / GB, 2) == spec_gb


@pytest.mark.parametrize(
    "build, component, bits",
    [(lambda: T5Encoder(T5_XXL), "t5", 4), (lambda: MMDiT(SD35_MEDIUM_MMDIT), "transformer", 4),
     (lambda: MMDiT(SD35_MEDIUM_MMDIT), "transformer", 8), (lambda: MMDiT(SD35_LARGE_MMDIT), "transformer", 4),
     (lambda: CLIPTextEncoder(CLIP_G), "clip_g", 8)],
    ids=["t5-4", "medium-4", "medium-8", "large-4", "clip_g-8"],
)  # fmt: skip
def test_estimate_equals_the_quantized_network(build, component, bits):
    """With the component's keep list, the estimate is exactly what quantize_network makes."""
    assert network_bytes(build(), bits, component=component) == stored_bytes(lazily_quantized(build(), component, bits))


def test_keep_list_costs_what_it_keeps():
    """Medium 4-bit: the kept embedders and final projection add ~21 MB over the spec's 1.72 GB."""
    model = MMDiT(SD35_MEDIUM_MMDIT)
    extra = network_bytes(model, 4, component="transformer") - network_bytes(model, 4)
    assert 0.01 * GB < extra < 0.03 * GB


def test_default_budget_is_positive():
    budget = default_budget_bytes()
    assert isinstance(budget, int) and budget > 0


# ---- stage estimates -----------------------------------------------------------------------------------
def test_streamed_t5_is_one_block_not_the_encoder(medium):
    c = T5_XXL
    block16 = 2 * (4 * c.d_model * c.num_heads * c.d_kv + 3 * c.d_model * c.d_ff + 2 * c.d_model)
    qkv16 = 2 * 3 * c.d_model * c.num_heads * c.d_kv
    assert medium.t5_streamed(None) == block16 + qkv16  # larger than the 0.26 GB embedding
    assert medium.t5_streamed(None) < network_bytes(medium.t5) / 15
    assert medium.t5_streamed(T5_4) > medium.t5_streamed(None)  # 16-bit read + 4-bit copy
    # with T5 streamed, CLIP-G (1.39 GB) is the largest encoder
    assert medium.encode(None, "streamed") == medium.encode(None, "dropped") == int(network_bytes(medium.clips[1]) + 0.1 * GB)


def test_trimmed_transformer_saves_exactly_conditioning_weights_and_table():
    plain = MemoryEstimator(SD35_MEDIUM_MMDIT, device=GPU)
    trimmed = MemoryEstimator(SD35_MEDIUM_MMDIT, device=GPU, trimmed_transformer=True)
    c = SD35_MEDIUM_MMDIT
    conditioning = sum(p.size for k, p in tree_flatten(plain.transformer.parameters())
                       if "adaLN" in k or k.startswith(("t_embedder.", "y_embedder."))) * 2  # fmt: skip
    table, crop = c.pos_embed_max_size**2 * c.hidden_size * 2, 64 * 64 * c.hidden_size * 2
    # 13 dual blocks (9 + 6 chunks), 10 plain (6 + 6), the last (6 + 2), the final layer 2
    chunks = 13 * 15 + 10 * 12 + 8 + 2
    modulations = 28 * 2 * chunks * c.hidden_size * 2
    saved = plain.denoise(None, 1024, 1024, 256) - trimmed.denoise(None, 1024, 1024, 256, steps=28)
    assert saved == conditioning + table - crop - modulations
    assert conditioning > 1.4 * GB  # ~31% of Medium: worth precomputing the modulations
    # 4-bit: the adaLN layers are quantized, the embedders kept at 16-bit (keep list)
    saved4 = plain.denoise(TR_4, 1024, 1024, 256) - trimmed.denoise(TR_4, 1024, 1024, 256, steps=28)
    assert saved4 == trimmed.conditioning_bytes(TR_4) + table - crop - modulations
    assert 0.4 * GB < trimmed.conditioning_bytes(TR_4) < 0.5 * GB


def test_cpu_counts_the_attention_scores():
    """MLX's CPU attention materialises (tokens x tokens) scores per head; the GPU term is fitted."""
    cpu = MemoryEstimator(SD35_MEDIUM_MMDIT, device=CPU)
    tokens = 64 * 64 + 77 + 256
    weights = cpu._bytes("transformer", cpu.transformer, TR_4)
    streams = 2 * tokens * 1536 * 2 * 16
    assert cpu.denoise(TR_4, 1024, 1024, 256) == weights + streams + 2 * 24 * tokens**2 * 2


def test_measured_cpu_attention_matches_the_cpu_term():
    """The CPU term above, measured: one bf16 attention over 2 x 4 heads x 1024 tokens."""
    q = mx.random.normal((2, 4, 1024, 64)).astype(mx.bfloat16)
    mx.eval(q)
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    with mx.stream(mx.cpu):
        out = mx.fast.scaled_dot_product_attention(q, q, q, scale=0.125)
        mx.eval(out)
    scores = 2 * 4 * 1024 * 1024 * 2
    assert scores <= mx.get_peak_memory() - before <= scores * 1.2 + 4 * out.nbytes


def test_tiled_decode_is_bounded(medium):
    assert medium.decode(2048, 2048, tiled=True) == medium.decode(512, 512, tiled=False)
    assert medium.decode(1024, 1024, tiled=False) > 3 * medium.decode(1024, 1024, tiled=True)


# ---- plans ---------------------------------------------------------------------------------------------
def choice(plan):
    return plan.transformer_bits, plan.t5_bits, plan.t5, plan.tile_vae


@pytest.mark.parametrize(
    "model, size, budget_gb, expected",
    [
        ("medium", 1024, 20, (None, None, "loaded", False)),  # everything 16-bit, untiled
        ("medium", 1024, 11, (None, None, "loaded", True)),  # the VAE tiled first (it only costs time)
        ("medium", 1024, 6, (None, 8, "loaded", True)),  # ... then T5 quantized
        ("medium", 1024, 4, (None, 4, "loaded", True)),
        ("medium", 1024, 2.5, (8, None, "streamed", True)),  # T5 streamed, transformer 8-bit
        ("medium", 1024, 2.0, (4, None, "streamed", True)),  # the 2.0 GB target (H100: 1.95 GB measured)
        ("medium", 512, 6, (None, 8, "loaded", False)),  # at 512² the decode is one tile anyway
        ("large", 1024, 30, (None, None, "loaded", False)),
        ("large", 1024, 12, (None, None, "loaded", True)),  # 11.4 GB: adaLN (5.3 GB at 16-bit) freed
        ("large", 1024, 11, (8, None, "streamed", True)),
        ("large", 1024, 5, (4, None, "streamed", True)),  # the 5 GB target (H100: 4.96 GB measured)
        ("large", 512, 6, (4, None, "streamed", False)),
    ],
)
def test_plan_choices(request, model, size, budget_gb, expected):
    estimator = request.getfixturevalue(model)
    plan = plan_memory(estimator, int(budget_gb * GB), size, size)
    assert choice(plan) == expected, plan.describe()
    assert plan.peak <= throttle_bytes(int(budget_gb * GB), plan.headroom) < budget_gb * GB


def test_trimming_and_split_cfg_lower_the_denoise_estimate():
    """Freeing adaLN / the full table and running CFG as two batch-1 passes each count."""
    plain = MemoryEstimator(SD35_MEDIUM_MMDIT, device=GPU)
    trimmed = MemoryEstimator(SD35_MEDIUM_MMDIT, device=GPU, trimmed_transformer=True)
    split = MemoryEstimator(SD35_MEDIUM_MMDIT, device=GPU, trimmed_transformer=True, split_cfg=True)
    p, t, s = (e.plan(TR_4, None, "streamed", True, 1024, 1024, 256, 32).stages["denoise"] for e in (plain, trimmed, split))
    assert p > t > s


@pytest.mark.parametrize("model, size", [("medium", 1024), ("medium", 512), ("large", 1024), ("large", 512)])
def test_plan_is_the_best_that_fits(request, model, size):
    """For a sweep of budgets: the plan fits, and no better candidate (earlier in the ladder,
    tiled or not) does; below the smallest plan, a refusal."""
    est = request.getfixturevalue(model)
    tiles = ((False, None),) + tuple((True, t) for t in DECODE_TILES)
    ladder = [est.plan(tr, t5, mode, tile, size, size, 256, t, split)
              for tr, t5, mode in candidates() for split in (False, True) for tile, t in tiles]  # fmt: skip
    lowest = min(p.peak + throttle_margin() + p.headroom for p in ladder)  # the smallest budget that fits
    for budget in np.linspace(lowest, 1.1 * max(p.peak for p in ladder), 25).astype(np.int64):
        plan = plan_memory(est, int(budget), size, size)
        assert plan.peak <= throttle_bytes(int(budget), plan.headroom)
        keys = [choice(p) + (p.decode_tile, p.split_cfg) for p in ladder]
        better = ladder[: keys.index(choice(plan) + (plan.decode_tile, plan.split_cfg))]
        assert all(p.peak > throttle_bytes(int(budget), p.headroom) for p in better)
    with pytest.raises(InputError):
        plan_memory(est, lowest - 1, size, size)


def test_cfg_is_split_only_when_one_pass_does_not_fit(large):
    """Two batch-1 passes cost 13-22% per step: only when the batch of 2 does not fit."""
    one = plan_memory(large, int(5 * GB), 1024, 1024)
    assert not one.split_cfg and choice(one) == (4, None, "streamed", True)
    two = plan_memory(large, int(4.2 * GB), 1024, 1024)
    assert two.split_cfg and choice(two) == (4, None, "streamed", True)
    assert two.stages["denoise"] < one.stages["denoise"] and "CFG as two passes" in two.describe()
    # room for the MLP activation (batch x tokens x 4H at 16-bit) that can land past the limit
    assert one.headroom == 2 * two.headroom == 2 * (4096 + 333) * 4 * 2432 * 2
    one_pass_only = MemoryEstimator(SD35_LARGE_MMDIT, device=GPU, trimmed_transformer=True)
    with pytest.raises(InputError, match="denoise"):
        plan_memory(one_pass_only, int(4.2 * GB), 1024, 1024)


def test_t5_is_never_dropped_for_memory(medium, large):
    """Streamed T5 needs less than CLIP-G, so dropping it never lowers the peak."""
    for est in (medium, large):
        for size in (512, 1024):
            for budget in np.linspace(1.0, 30.0, 59):
                try:
                    plan = plan_memory(est, int(budget * GB), size, size)
                except InputError:
                    continue
                assert plan.t5 != "dropped"


def test_refusal_names_the_smallest_plan_and_its_stage(medium):
    smallest = medium.plan(TR_4, None, "streamed", True, 2048, 2048, 256, DECODE_TILES[-1])
    with pytest.raises(InputError) as e:
        plan_memory(medium, int(2.0 * GB), 2048, 2048)
    msg = str(e.value)
    need = smallest.peak + throttle_margin() + smallest.headroom
    assert "2.00 GB budget" in msg and f"needs about {need / GB:.2f} GB" in msg
    assert "denoise stage" in msg and "transformer 4-bit" in msg
    with pytest.raises(InputError, match="encode stage. The text encoders set the floor"):
        plan_memory(medium, int(1.3 * GB), 1024, 1024)  # CLIP-G (1.39 GB) does not fit


def test_fixed_settings_are_kept(medium):
    plan = plan_memory(medium, int(2.0 * GB), 1024, 1024, fixed={"t5": T5_4})
    assert choice(plan) == (4, 4, "streamed", True)
    with pytest.raises(InputError, match="denoise"):
        plan_memory(medium, int(3 * GB), 1024, 1024, fixed={"transformer": None})


def test_plans_hand_back_the_specs_they_were_made_with(medium):
    """The pipeline takes `plan.quantization()` as is: the specs of the rung, T5's unless dropped,
    and a fixed spec (e.g. a converted folder's 4-bit group-32 T5) itself, not just its bits."""
    for tr, t5, mode in candidates():
        plan = medium.plan(tr, t5, mode, True, 1024, 1024, 256)
        assert plan.quantization() == ({"transformer": tr} if mode == "dropped" else {"transformer": tr, "t5": t5})
        assert plan.t5 is T5Mode(mode) and plan.transformer_bits == (tr.bits if tr else None)
    stored = make_spec("t5", 4, 32)
    plan = plan_memory(medium, int(2.0 * GB), 1024, 1024, fixed={"t5": stored})
    assert plan.quantization()["t5"] is stored and "4-bit g32" in plan.describe()


def test_a_fixed_t5_mode_is_kept(medium):
    """T5 dropped (t5=False) or streamed by request: the planner plans that, not T5 loaded."""
    dropped = plan_memory(medium, int(20 * GB), 1024, 1024, t5_mode=T5Mode.DROPPED)
    assert choice(dropped) == (None, None, "dropped", False)
    assert dropped.stages["encode"] == medium.encode(None, T5Mode.DROPPED)
    streamed = plan_memory(medium, int(20 * GB), 1024, 1024, t5_mode=T5Mode.STREAMED)
    assert choice(streamed) == (None, None, "streamed", False)


# ---- the planner's streamed-T5 number against a measurement -------------------------------------------
def test_streamed_t5_estimate_covers_the_measured_peak(tmp_path):
    """A bf16 T5 (d_model 512, 6 blocks) streamed from a file: the measured peak is within
    the estimator's `t5_streamed` (plus a small activation allowance) and not far below."""
    from sd35_mlx.streaming import StreamedT5

    config = T5Config(d_model=512, num_layers=6, num_heads=8, d_kv=64, d_ff=1024, vocab_size=300)
    model = T5Encoder(config)
    model.set_dtype(mx.bfloat16)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(tmp_path / "t5.safetensors"), weights)
    del model, weights
    est = MemoryEstimator(SD35_MEDIUM_MMDIT, t5=config, device=GPU)
    streamed = StreamedT5.from_files([tmp_path / "t5.safetensors"], config=config)
    ids = mx.array(np.random.RandomState(0).randint(0, 300, (1, 16)))
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(streamed(ids))
    measured = mx.get_peak_memory() - before
    activations = 1 * 16 * (config.d_ff * 3 + config.d_model * 8) * 4 + 8 * 16 * 16 * 4
    assert 0.5 * est.t5_streamed(None) <= measured <= est.t5_streamed(None) + activations


# ---- the memory limit the pipeline sets under a budget ---------------------------------------------
def _chain_peak(weights, limit=None) -> int:
    """Peak above the resident weights of a chain whose every layer makes a temporary (8 MB)."""
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    with memory_limit(None if limit is None else base + limit):
        x = mx.ones((8, 2048), dtype=mx.bfloat16)
        for w in weights:
            x = mx.tanh(x @ (w * 2 + 1))  # evaluation queues ahead of the compute thread
        mx.eval(x)
    return mx.get_peak_memory() - base


def test_memory_limit_holds_queued_temporaries_down():
    """MLX keeps an operation's inputs until its queued work has run; without a limit the
    temporaries of many layers coexist. Past the limit evaluation waits, and the previous
    limit comes back afterwards."""
    weights = [mx.random.normal((2048, 2048)).astype(mx.bfloat16) for _ in range(24)]
    mx.eval(weights)
    before = mx.set_memory_limit(10**12)
    mx.set_memory_limit(before)
    free = _chain_peak(weights)
    held = _chain_peak(weights, limit=20 * 10**6)
    assert free > 40 * 10**6  # several layers' temporaries at once
    assert held < free / 2
    assert mx.set_memory_limit(before) == before  # restored


def test_throttle_leaves_room_below_the_budget(monkeypatch):
    from sd35_mlx import memory

    monkeypatch.delenv("MLX_MAX_MB_PER_BUFFER", raising=False)
    monkeypatch.setattr(memory.mx.cuda, "is_available", lambda: False)
    assert throttle_bytes(int(2 * GB)) == int(2 * GB) - THROTTLE_MARGIN
    assert throttle_bytes(int(2 * GB), 10**8) == int(2 * GB) - THROTTLE_MARGIN - 10**8  # room for a large op
    assert throttle_bytes(10**8) == 5 * 10**7  # never below half a tiny budget
    monkeypatch.setattr(memory.mx.cuda, "is_available", lambda: True)  # MLX CUDA: 1000 MB buffers by default
    assert throttle_margin() == memory.CUDA_DEFAULT_BUFFER_MB * 10**6 > THROTTLE_MARGIN
    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "100")  # what the CLI sets on Linux
    assert throttle_margin() == THROTTLE_MARGIN
    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "400")  # the margin is one buffer, whatever its size
    assert throttle_margin() == 4 * 10**8


def test_budget_limit_is_the_plans_need_plus_queue_room_within_the_budget(monkeypatch):
    """Under a budget MLX is held to the plan's estimate + QUEUE_ROOM (so the estimate describes
    the measured peak), never above throttle_bytes(budget)."""
    from sd35_mlx import memory

    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "100")
    est = MemoryEstimator(SD35_MEDIUM_MMDIT, trimmed_transformer=True, split_cfg=True)
    spec = make_spec("transformer", 4)
    plan = est.plan(spec, None, T5Mode.STREAMED, True, 1024, 1024, 256, DECODE_TILES[-1])
    roomy = memory.budget_limit(int(100 * GB), plan)
    assert roomy == int(plan.peak * (1 + memory.QUEUE_ROOM))
    tight = int(plan.peak + throttle_margin() + plan.headroom + 10**7)
    assert memory.budget_limit(tight, plan) == throttle_bytes(tight, plan.headroom) < roomy
    assert memory.budget_limit(int(2 * GB)) == throttle_bytes(int(2 * GB))  # no plan: the budget's limit


def test_denoise_setup_counts_when_it_exceeds_the_step():
    """A shallow model's denoise stage is set by the Denoiser's setup (adaLN weights and the
    full position table, read once and freed), not by the step: measured on the CPU at 128²
    with one block (docs/benchmarks.md, 0.47 GB)."""
    from dataclasses import replace

    shallow = replace(SD35_MEDIUM_MMDIT, depth=1, dual_attention_layers=(0,))
    est = MemoryEstimator(shallow, device=GPU, trimmed_transformer=True, split_cfg=True)
    table = shallow.pos_embed_max_size**2 * shallow.hidden_size * 2
    need = est.denoise(TR_4, 128, 128, 8, batch=2)
    assert table + est.conditioning_bytes(TR_4) == need
    assert 0.4e9 < need < 0.5e9  # the measured peak: 0.47 GB


@pytest.mark.parametrize("config", [SD35_MEDIUM_MMDIT, SD35_LARGE_MMDIT], ids=["medium", "large"])
def test_the_plans_dense_block_is_the_quantized_networks(config):
    """The plan's dense block (what the shared per-block de-quantization allocates at once) is
    the loaded network's `block_dense_bytes`, from the estimator's lazy 16-bit model."""
    est = MemoryEstimator(config, device=GPU, trimmed_transformer=True)
    plan = est.plan(TR_4, None, T5Mode.DROPPED, True, 1024, 1024, 256, DECODE_TILES[-1])
    assert plan.dense_block == lazily_quantized(MMDiT(config), "transformer", 4).block_dense_bytes() > 0
    assert est.plan(None, None, T5Mode.DROPPED, True, 1024, 1024, 256, DECODE_TILES[-1]).dense_block == 0


def test_expected_peak_is_the_limit_and_the_largest_allocation_past_it(monkeypatch):
    """Under a budget the peak is the stage's memory limit (queued work fills it) plus the one
    allocation that may land past it: the dense block where it fits above the limit and the
    pipeline de-quantizes per block, else the MLP activation (H200, 1024²: 1.95 / 1.89 / 4.97 GB
    measured for Medium 4-bit, Medium T5-drop, Large 4-bit)."""
    from sd35_mlx import memory

    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "100")
    est = MemoryEstimator(SD35_MEDIUM_MMDIT, device=GPU, trimmed_transformer=True)
    plan = est.plan(TR_4, None, T5Mode.STREAMED, True, 1024, 1024, 256, DECODE_TILES[-1])  # CFG as one batch
    assert plan.dense_block > plan.headroom > 0
    roomy = int(2.5 * GB)
    assert memory.dequantizes_per_block(roomy, plan, plan.dense_block)
    assert memory.expected_peak(roomy, plan) == memory.budget_limit(roomy, plan) + plan.dense_block
    tight = int(2.0 * GB)  # no room above the limit: the blocks de-quantize layer by layer
    assert not memory.dequantizes_per_block(tight, plan, plan.dense_block)
    assert memory.expected_peak(tight, plan) == memory.budget_limit(tight, plan) + plan.headroom
    assert memory.dequantizes_per_block(None, plan, plan.dense_block)  # no budget: always
