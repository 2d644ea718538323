"""Memory of img2img and inpainting: the planner counts the init image's VAE encode (its own
stage, `init_image`, after the text encoders) and what it leaves resident, and under
memory_budget=B the whole generation's measured peak stays ≤ B (CPU, tiny model, the real
pipeline). At 384² the tiny model's untiled encode (~0.22 GB on the CPU) is larger than every
other stage, so a plan that leaves it out does not fit the budgets measured here."""

from __future__ import annotations

import mlx.core as mx
import pytest

from control_assets import tiny_stability_controlnet, write_mask, write_photo
from lora_files import PEFT, dotted_key, linear_stems, random_lora, save
from tiny_model import TinySpec, make_tiny_model

from sd35_mlx import memory
from sd35_mlx.config import SD35_MEDIUM_MMDIT
from sd35_mlx.errors import InputError
from sd35_mlx.memory import GB, MemoryEstimator, T5Mode, plan_memory
from sd35_mlx.pipeline import SD35Pipeline

H, W = 384, 384  # the tiny model's largest size with a 24-patch position grid
PROMPT = "a lighthouse on a cliff"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_init_memory")
    reference = make_tiny_model(root, TinySpec(pos_embed_max_size=24))
    photo, mask = root / "photo.png", root / "mask.png"
    write_photo(photo, side=W)
    write_mask(mask, side=W)
    state = reference.transformer.state_dict()
    tensors, _ = random_lora(state, linear_stems(state), dotted_key("transformer."), suffixes=PEFT, with_alpha=False, seed=1)
    save(tensors, root / "loras" / "style.safetensors")
    return root, str(photo), str(mask)


def _pipe(root, budget_gb, **options):
    return SD35Pipeline.from_pretrained(root, dtype=mx.float32, memory_budget=budget_gb, plan_size=(H, W), **options)


def _smallest_budget(plan) -> int:
    """The least budget this plan fits: its peak under throttle_bytes(budget, headroom)."""
    return plan.peak + memory.throttle_margin() + plan.headroom


def _least_budget_that_plans(pipe) -> int:
    """The smallest budget for which the planner finds any plan (bisected, to 1 kB)."""
    est = pipe._estimator(pipe.transformer_config)
    lo, hi = 0, int(100 * GB)
    while hi - lo > 1000:
        mid = (lo + hi) // 2
        try:
            plan_memory(est, mid, H, W)
            hi = mid
        except InputError:
            lo = mid
    return hi


def test_the_plan_counts_the_init_image_stage_in_order(tiny, tmp_path):
    root, _, _ = tiny
    plain, img2img = _pipe(root, 50.0), _pipe(root, 50.0, plan_init_image=True)
    est = img2img._estimator(img2img.transformer_config)
    held = est.init_latents_bytes(H, W)
    assert held == (H // 8) * (W // 8) * 17 * 4  # 16 latent channels and a mask, float32
    assert list(plain.plan.stages) == ["encode", "denoise", "decode"]
    assert list(img2img.plan.stages) == ["encode", "init_image", "denoise", "decode"]
    assert img2img.plan.stages["init_image"] == est.image_encode(H, W) > plain.plan.stages["encode"]
    assert img2img.plan.stages["denoise"] == plain.plan.stages["denoise"] + held  # latents held while denoising
    assert img2img.plan.stages["encode"] == plain.plan.stages["encode"]
    assert img2img.plan.peak > plain.plan.peak
    # with a ControlNet too: the init image is encoded first, its latents held through the control encode
    cn = str(tiny_stability_controlnet(tmp_path / "sd3.5_tiny_controlnet_canny.safetensors"))
    both = _pipe(root, 50.0, plan_init_image=True, controlnets=[cn])
    assert list(both.plan.stages) == ["encode", "init_image", "control", "denoise", "decode"]
    assert both.plan.stages["control"] == both.plan.stages["init_image"] + held


def test_an_init_image_needs_more_and_a_tight_budget_tiles_its_encode():
    """SD3.5 Medium at 1024² on a GPU: the untiled init encode needs ~4 GB; under a 3 GB budget the planner tiles the VAE, and the encode then runs (and is counted) in
    256-pixel tiles, so img2img fits where text-to-image does."""
    gpu = mx.Device(mx.DeviceType.gpu)
    plain = MemoryEstimator(SD35_MEDIUM_MMDIT, device=gpu, trimmed_transformer=True, split_cfg=True)
    img2img = MemoryEstimator(SD35_MEDIUM_MMDIT, device=gpu, trimmed_transformer=True, split_cfg=True, init_image=True)
    setting = (None, None, T5Mode.STREAMED, False, 1024, 1024, 256)
    a, b = plain.plan(*setting), img2img.plan(*setting)
    assert b.stages["init_image"] > 3.5 * GB and "init_image" not in a.stages
    held = img2img.init_latents_bytes(1024, 1024)  # the init latents (and a mask) stay until denoising ends
    assert b.stages["denoise"] == a.stages["denoise"] + held and b.stages["decode"] == a.stages["decode"]
    fits = plan_memory(plain, int(3 * GB), 1024, 1024)
    tiled = plan_memory(img2img, int(3 * GB), 1024, 1024)
    assert fits.peak < 3 * GB and tiled.peak < 3 * GB
    assert tiled.tile_vae and tiled.stages["init_image"] == img2img.image_encode(1024, 1024, tiled.decode_tile * 8)
    assert tiled.stages["init_image"] < b.stages["init_image"] / 2


def _measured_init_encode(monkeypatch):
    """Wrap SD35Pipeline.encode_image: its own peak above what was resident, and the peak before it."""
    seen = {}
    encode = SD35Pipeline.encode_image

    def measured(self, image):
        seen["peak_before"], resident = mx.get_peak_memory(), mx.get_active_memory()
        mx.reset_peak_memory()
        out = encode(self, image)
        seen["need"] = mx.get_peak_memory() - resident
        return out

    monkeypatch.setattr(SD35Pipeline, "encode_image", measured)
    return seen


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpainting"])
@pytest.mark.parametrize("factor", [1.0, 1.4])
def test_measured_peak_of_an_init_image_generation_stays_within_the_budget(tiny, inpaint, factor, monkeypatch):
    """From the least budget the planner accepts. The throttle's margin is shrunk to 10 MB
    (its 0.1 GB floor is one GPU command buffer, larger than the tiny model's stages, and would
    hide a missing stage): the budget is then the estimate. Measured: a plan without the
    init_image stage, at its least budget (0.11 GB), peaks at 0.15 GB; this one (0.23 GB) at 0.16."""
    root, photo, mask = tiny
    monkeypatch.setattr(memory, "throttle_margin", lambda: 10**7)
    budget = int(_least_budget_that_plans(_pipe(root, 100.0, plan_init_image=True)) * factor)
    pipe = _pipe(root, budget / 1e9, plan_init_image=True)
    assert "init_image" in pipe.plan.stages
    seen = _measured_init_encode(monkeypatch)
    mx.clear_cache()
    mx.reset_peak_memory()
    pipe.generate(PROMPT, seed=0, steps=2, width=W, height=H, cfg=4.0, init_image=photo, strength=0.8,
                  mask=mask if inpaint else None)  # fmt: skip
    peak = max(mx.get_peak_memory(), seen["peak_before"])
    assert peak <= budget, (peak, budget, pipe.plan.describe())
    # the init image's encode (and the VAE's lazy load) needs no more than the plan says
    assert 0 < seen["need"] <= pipe.plan.stages["init_image"], (seen, pipe.plan.describe())
    assert pipe._vae is None  # released after the decode (and after the init encode: low_memory)


def test_a_plan_made_without_the_init_image_gains_the_stage_or_refuses_before_loading(tiny, monkeypatch):
    root, photo, _ = tiny
    plain = _pipe(root, 100.0)
    tight = _pipe(root, _smallest_budget(plain.plan) / 1e9)  # fits text-to-image, not the init encode
    assert "init_image" not in tight.plan.stages
    with pytest.raises(InputError) as refused:
        tight.generate(PROMPT, seed=0, steps=1, width=W, height=H, init_image=photo)
    msg = str(refused.value)
    assert "init_image stage" in msg and "smaller image" in msg and "plan_init_image=True" in msg
    assert (tight._encoders, tight._transformer, tight._vae) == (None, None, None)  # nothing loaded
    assert "init_image" not in tight.plan.stages  # the plan as it was

    roomy = _pipe(root, 50.0)
    loaded = []
    load_encoders = SD35Pipeline._load_encoders
    monkeypatch.setattr(SD35Pipeline, "_load_encoders", lambda self: loaded.append(self.plan) or load_encoders(self))
    roomy.generate(PROMPT, seed=0, steps=1, width=128, height=128, init_image=photo)
    assert list(roomy.plan.stages) == ["encode", "init_image", "denoise", "decode"]
    assert loaded[0] is roomy.plan  # planned before the text encoders loaded
    assert roomy.plan == _pipe(root, 50.0, plan_init_image=True).plan


def test_a_plan_gaining_the_init_image_stage_still_holds_the_loras_factors(tiny):
    root, _, _ = tiny
    pipe = _pipe(root, 50.0)
    lora = pipe.load_lora(str(root / "loras" / "style.safetensors"))
    factors = lora.factor_bytes("transformer", mx.float32)
    pipe._plan_init_image()  # what a generation with an init image does first
    planned = _pipe(root, 50.0, plan_init_image=True).plan
    assert list(pipe.plan.stages) == ["encode", "init_image", "denoise", "decode"]
    assert pipe.plan.stages["denoise"] == planned.stages["denoise"] + factors > planned.stages["denoise"]
    assert pipe.plan.stages["init_image"] == planned.stages["init_image"]
    pipe.unload_lora()
    assert pipe.plan == planned  # the room given back, the init image's stage kept


def test_the_cli_plans_for_the_init_image_at_its_size(tiny, tmp_path, monkeypatch):
    """--init-image without -W/-H: the plan is made for the init image's size, with its encode."""
    from PIL import Image

    from sd35_mlx import generate

    root, _, _ = tiny
    wide = tmp_path / "wide.png"
    Image.new("RGB", (320, 192), (90, 140, 30)).save(wide)
    asked = {}

    def from_pretrained(model, **options):
        asked.update(options)
        raise InputError("stop here: only the load options are checked")

    monkeypatch.setattr(SD35Pipeline, "from_pretrained", staticmethod(from_pretrained))
    for key, value in memory.SMALL_COMMAND_BUFFERS.items():  # what the CLI sets: restored afterwards
        monkeypatch.setenv(key, value)
    code = generate.main(["--model", str(root), "--prompt", PROMPT, "--init-image", str(wide), "--memory-budget", "4",
                          "-o", str(tmp_path / "out.png")])  # fmt: skip
    assert code != 0
    assert asked["plan_init_image"] is True and asked["plan_size"] == (192, 320)


def test_a_tiled_plan_encodes_in_tiles_and_counts_them(tmp_path):
    """When the plan tiles the VAE, the init image (and control image) encodes run in the plan's
    tiles: the stage is estimated at one tile and the pipeline's encode is `encode_tiled`'s."""
    from dataclasses import replace

    import numpy as np

    from sd35_mlx.memory import MemoryEstimator
    from sd35_mlx.models.vae_tiling import encode_tiled
    from sd35_mlx.pipeline import SD35Pipeline
    from tiny_model import TinySpec, make_tiny_model

    make_tiny_model(tmp_path, TinySpec())
    pipe = SD35Pipeline.from_pretrained(tmp_path, dtype=mx.float32, memory_budget=50.0, plan_size=(128, 128))
    est = MemoryEstimator(pipe.transformer_config, init_image=True)
    whole = est.plan(None, None, "loaded", False, 1024, 1024, 256)
    tiled = est.plan(None, None, "loaded", True, 1024, 1024, 256, tile_latents=32)
    assert tiled.stages["init_image"] == est.image_encode(1024, 1024, 256) < whole.stages["init_image"]
    assert pipe.encode_tile is None  # an untiled plan encodes whole
    image = mx.random.uniform(-1, 1, (1, 128, 128, 3), key=mx.random.key(0))
    untiled = pipe.encode_image(image)
    pipe.plan = replace(pipe.plan, tile_vae=True, decode_tile=8)  # 64-pixel tiles
    assert pipe.encode_tile == 64
    got = pipe.encode_image(image)
    vae = pipe._load_vae()
    expected = vae.to_latents(encode_tiled(vae, image, tile=64, overlap=16)[0].astype(mx.float32))
    assert np.array_equal(np.array(got), np.array(expected))
    assert not np.array_equal(np.array(got), np.array(untiled))  # tiles see their own statistics
