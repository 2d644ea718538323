"""Memory of a ControlNet generation: the planner counts the ControlNet's stages, and under
memory_budget=B the whole generation's measured peak stays ≤ B (CPU, tiny model, the real
pipeline: a Stability-layout ControlNet, canny-preprocessed control image, VAE-encoded)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from control_assets import tiny_stability_controlnet, write_photo
from tiny_model import TinySpec, make_tiny_model

from sd35_mlx import memory
from sd35_mlx.control.settings import ControlNetSettings
from sd35_mlx.errors import InputError
from sd35_mlx.pipeline import SD35Pipeline

H, W = 128, 128  # large enough that the VAE passes' activations are not negligible
PROMPT = "a lighthouse on a cliff"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_control_memory")
    make_tiny_model(root, TinySpec())
    cn = tiny_stability_controlnet(root / "sd3.5_tiny_controlnet_canny.safetensors")
    photo = root / "photo.png"
    write_photo(photo, side=W)
    return root, str(cn), str(photo)


def _pipe(root, budget_gb, controlnets=()):
    return SD35Pipeline.from_pretrained(root, dtype=mx.float32, memory_budget=budget_gb, plan_size=(H, W),
                                        controlnets=list(controlnets))  # fmt: skip


def test_the_plan_counts_the_controlnet_stages(tiny, tmp_path):
    root, cn, _ = tiny
    plain, with_cn = _pipe(root, 50.0), _pipe(root, 50.0, [cn])
    assert "control" not in plain.plan.stages
    est = with_cn._estimator(with_cn.transformer_config)
    assert with_cn.plan.stages["control"] == est.image_encode(H, W) > 0  # the control image's VAE encode
    assert with_cn.plan.stages["denoise"] > plain.plan.stages["denoise"]
    assert with_cn.plan.stages["encode"] == plain.plan.stages["encode"]
    # a converted 4-bit ControlNet is planned at its stored bits, not at 16-bit
    from diffusers import SD3ControlNetModel
    from reference import randomize

    from sd35_mlx.control.convert import convert_controlnet

    source = tmp_path / "diffusers-cn"  # image-only blocks, wide enough for 4-bit groups of 64
    randomize(SD3ControlNetModel(patch_size=2, in_channels=16, num_layers=1, attention_head_dim=32,
                                 num_attention_heads=2, joint_attention_dim=None, caption_projection_dim=64,
                                 pooled_projection_dim=40, out_channels=16, pos_embed_max_size=None,
                                 pos_embed_type=None, use_pos_embed=False), seed=4).save_pretrained(source)  # fmt: skip
    cn4 = convert_controlnet(source, tmp_path / "cn4", dtype="float32", quantize="controlnet=4")
    cn16 = convert_controlnet(source, tmp_path / "cn16", dtype="float32")
    d4, d16 = (_pipe(root, 50.0, [str(p)]).plan.stages["denoise"] for p in (cn4, cn16))
    assert plain.plan.stages["denoise"] < d4 < d16, (d4, d16)


@pytest.mark.parametrize("factor", [1.3, 2.5])
def test_measured_peak_of_a_controlnet_generation_stays_within_the_budget(tiny, factor, monkeypatch):
    root, cn, photo = tiny
    probe = _pipe(root, 100.0, [cn])
    smallest = probe.plan.peak + memory.throttle_margin() + probe.plan.headroom
    budget = int(smallest * factor)
    try:
        pipe = _pipe(root, budget / 1e9, [cn])
    except InputError:  # no plan fits at this budget: nothing to measure
        pytest.skip("no plan fits")
    from sd35_mlx.control.prepare import ControlSession

    control = {}
    prepare = ControlSession.prepare

    def measured_prepare(self, *args, **kwargs):  # the control stage: its own peak above what was resident
        peak_before, resident = mx.get_peak_memory(), mx.get_active_memory()
        mx.reset_peak_memory()
        out = prepare(self, *args, **kwargs)
        control["need"] = mx.get_peak_memory() - resident
        mx.reset_peak_memory()
        control["peak_before"] = peak_before
        return out

    monkeypatch.setattr(ControlSession, "prepare", measured_prepare)
    mx.clear_cache()
    mx.reset_peak_memory()
    pipe.generate(PROMPT, seed=0, steps=2, width=W, height=H, cfg=4.0,
                  controlnets=(ControlNetSettings(cn, image=photo, preprocess="canny"),))  # fmt: skip
    assert [s.control_type for s in pipe.control_specs] == ["canny"]  # the Stability canny path ran
    peak = max(mx.get_peak_memory(), control["peak_before"])
    assert peak <= budget, (peak, budget, pipe.plan.describe())
    # the control image's encode (and the ControlNet's lazy load) needs no more than the plan says
    assert 0 < control["need"] <= pipe.plan.stages["control"], (control, pipe.plan.describe())
