"""ControlNet parity against diffusers' SD3ControlNetModel (joint, image-only and inpainting
variants), the Stability single-file layout through the mapping diffusers' conversion script
applies (done here in torch), config inference, and both residual rules in the MMDiT against
diffusers' SD3Transformer2DModel (its own rule, and Stability's via a hook on the last block)."""

from __future__ import annotations

from typing import Dict

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import SD3ControlNetModel, SD3Transformer2DModel
from control_assets import SHARED_PREFIXES, stability_state
from reference import nchw_to_nhwc, randomize, rel_err, to_numpy

from sd35_mlx.config import ControlNetConfig
from sd35_mlx.control.residuals import DIFFUSERS as DIFFUSERS_RULE
from sd35_mlx.control.residuals import STABILITY as STABILITY_RULE
from sd35_mlx.control.residuals import block_residuals
from sd35_mlx.errors import InputError, WeightMappingError
from sd35_mlx.weights.tables.controlnet import (
    DIFFUSERS, DIFFUSERS_IMAGE_ONLY, STABILITY, infer_config, layout_of, load_controlnet, read_control_type,
)  # fmt: skip
from sd35_mlx.weights.tables.mmdit import DIFFUSERS as MMDIT_DIFFUSERS
from sd35_mlx.weights.tables.mmdit import load_mmdit

TOL = 1e-4
HIDDEN, HEADS, CONTEXT, POOLED, POS = 128, 2, 32, 24, 16  # head size 64 as the released models


def to_mx(state: Dict[str, torch.Tensor]) -> Dict[str, mx.array]:
    return {k: mx.array(v.detach().float().numpy()) for k, v in state.items()}


def transformer(depth: int = 4, seed: int = 1) -> SD3Transformer2DModel:
    return randomize(SD3Transformer2DModel(
        sample_size=2 * POS, patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=64,
        num_attention_heads=HEADS, joint_attention_dim=CONTEXT, caption_projection_dim=HIDDEN,
        pooled_projection_dim=POOLED, out_channels=16, pos_embed_max_size=POS, qk_norm="rms_norm",
    ).eval(), seed)  # fmt: skip


def joint_controlnet(depth=2, extra=0, qk_norm=None, dual=(), seed=2) -> SD3ControlNetModel:
    return randomize(SD3ControlNetModel(
        sample_size=2 * POS, patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=64,
        num_attention_heads=HEADS, joint_attention_dim=CONTEXT, caption_projection_dim=HIDDEN,
        pooled_projection_dim=POOLED, out_channels=16, pos_embed_max_size=POS,
        extra_conditioning_channels=extra, qk_norm=qk_norm, dual_attention_layers=dual,
    ).eval(), seed)  # fmt: skip


def image_controlnet(depth=2, seed=3) -> SD3ControlNetModel:
    """The architecture diffusers' conversion script gives Stability's SD3.5 Large ControlNets."""
    return randomize(SD3ControlNetModel(
        patch_size=2, in_channels=16, num_layers=depth, attention_head_dim=64, num_attention_heads=HEADS,
        joint_attention_dim=None, caption_projection_dim=POOLED, pooled_projection_dim=POOLED,
        out_channels=16, pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False,
        force_zeros_for_pooled_projection=False,
    ).eval(), seed)  # fmt: skip


def stability_file(ref: SD3ControlNetModel, control_type: int = 1) -> Dict[str, torch.Tensor]:
    out = stability_state(ref.state_dict(), len(ref.transformer_blocks), control_type)
    out["pos_embed.proj.weight"] = torch.randn(HIDDEN, 16, 2, 2)  # SAI's unused own embedder
    out["pos_embed.proj.bias"] = torch.randn(HIDDEN)
    return out


def diffusers_conversion(sai: Dict[str, torch.Tensor], depth: int) -> Dict[str, torch.Tensor]:
    """The mapping of diffusers' scripts/convert_sd3_controlnet_to_diffusers.py, in torch."""
    out = {k: v for k, v in sai.items() if k.startswith(SHARED_PREFIXES)}
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for s in ("weight", "bias"):
            q, k, v = torch.chunk(sai[f"{b}attn.qkv.{s}"], 3, dim=0)
            out.update({f"{b}attn.to_q.{s}": q, f"{b}attn.to_k.{s}": k, f"{b}attn.to_v.{s}": v,
                        f"{b}attn.to_out.0.{s}": sai[f"{b}attn.proj.{s}"],
                        f"{b}ff.net.0.proj.{s}": sai[f"{b}mlp.fc1.{s}"],
                        f"{b}ff.net.2.{s}": sai[f"{b}mlp.fc2.{s}"],
                        f"{b}norm1.linear.{s}": sai[f"{b}adaLN_modulation.1.{s}"]})  # fmt: skip
    return out


def inputs(batch=2, h=8, w=12, channels=16, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        latents=torch.randn(batch, 16, h, w, generator=g),
        control=torch.randn(batch, channels, h, w, generator=g),
        context=torch.randn(batch, tokens, CONTEXT, generator=g),
        pooled=torch.randn(batch, POOLED, generator=g),
        timestep=torch.tensor([999.0, 321.5][:batch]),
    )


def check_outputs(ours, ref):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        err = rel_err(to_numpy(a), b.detach().numpy())
        assert err <= TOL, f"max|Δ|/max|ref| = {err:.2e}"


@pytest.mark.parametrize("variant", ["plain", "inpainting", "qk_norm_dual"])
def test_joint_controlnet_matches_diffusers(variant):
    extra = 1 if variant == "inpainting" else 0
    kw = dict(qk_norm="rms_norm", dual=(0,)) if variant == "qk_norm_dual" else {}
    ref = joint_controlnet(extra=extra, **kw)
    x = inputs(channels=16 + extra)
    with torch.no_grad():
        expected = ref(hidden_states=x["latents"], controlnet_cond=x["control"], conditioning_scale=0.7,
                       encoder_hidden_states=x["context"], pooled_projections=x["pooled"],
                       timestep=x["timestep"], return_dict=False)[0]  # fmt: skip
    net = load_controlnet(to_mx(ref.state_dict()))
    assert layout_of(ref.state_dict()) is DIFFUSERS
    cfg = net.config
    assert cfg.joint and cfg.control_channels == 16 + extra and cfg.pos_embed_max_size == POS
    assert cfg.qk_norm == (variant == "qk_norm_dual") and cfg.dual_attention_layers == tuple(kw.get("dual", ()))
    tokens = net.embed_latents(nchw_to_nhwc(x["latents"]))
    ours = net(tokens, nchw_to_nhwc(x["control"]), mx.array(x["timestep"].numpy()),
               mx.array(x["pooled"].numpy()), mx.array(x["context"].numpy()), scale=0.7)  # fmt: skip
    check_outputs(ours, expected)


def _image_only_reference(ref: SD3ControlNetModel, main: SD3Transformer2DModel, x):
    ref.pos_embed = ref._get_pos_embed_from_transformer(main)  # what the diffusers pipeline does
    with torch.no_grad():
        return ref(hidden_states=x["latents"], controlnet_cond=x["control"], conditioning_scale=0.5,
                   pooled_projections=x["pooled"], timestep=x["timestep"], return_dict=False)[0]  # fmt: skip


def _image_only_ours(net, main_mx, x):
    tokens = main_mx.embed_latents(nchw_to_nhwc(x["latents"]))
    return net(tokens, nchw_to_nhwc(x["control"]), mx.array(x["timestep"].numpy()),
               mx.array(x["pooled"].numpy()), scale=0.5)  # fmt: skip


@pytest.mark.parametrize("layout", ["diffusers", "stability"])
def test_image_only_controlnet_matches_diffusers(layout):
    """Stability's SD3.5 Large ControlNet architecture: image-only blocks starting from the
    transformer's own embedded latents. The Stability file goes through diffusers' conversion
    mapping to reach the reference model."""
    main = transformer()
    main_mx = load_mmdit(to_mx(main.state_dict()), MMDIT_DIFFUSERS)
    ref = image_controlnet()
    x = inputs()
    if layout == "stability":
        sai = stability_file(ref, control_type=2)
        ref.load_state_dict(diffusers_conversion(sai, depth=2), strict=True)
        tensors = to_mx(sai)
        tensors["control_type"] = mx.array(np.array([2], dtype=np.int32))
        assert layout_of(tensors) is STABILITY and read_control_type(tensors) == 2
    else:
        tensors = to_mx(ref.state_dict())
        assert layout_of(tensors) is DIFFUSERS_IMAGE_ONLY and read_control_type(tensors) is None
    net = load_controlnet(tensors)
    assert not net.config.joint and net.config.depth == 2 and net.config.num_heads == HEADS
    check_outputs(_image_only_ours(net, main_mx, x), _image_only_reference(ref, main, x))


def test_config_inference_full_size_shapes():
    """The SD3.5 Large ControlNet's tensor shapes (spec §2.1) give its configuration."""
    h = 2432
    shapes = {"control_embedder.weight": (h, 2, 2, 16), "y_embedder.fc1.weight": (h, 2048)}
    for i in range(19):
        shapes[f"blocks.{i}.adaLN.weight"] = (6 * h, h)
        shapes[f"blocks.{i}.mlp.fc1.weight"] = (4 * h, h)
    cfg = infer_config({k: _Shape(s) for k, s in shapes.items()})
    assert cfg == ControlNetConfig()


class _Shape:
    def __init__(self, shape):
        self.shape = shape


@pytest.mark.parametrize("hidden", [48, 100])
def test_heads_that_cannot_be_inferred_are_named(hidden):
    """No QK-norm and a hidden size that is not a multiple of 64: an error that says what to pass."""
    shapes = {"control_embedder.weight": (hidden, 2, 2, 16), "y_embedder.fc1.weight": (hidden, 2048),
              "blocks.0.adaLN.weight": (6 * hidden, hidden), "blocks.0.mlp.fc1.weight": (4 * hidden, hidden)}
    with pytest.raises(WeightMappingError, match="num_heads"):
        infer_config({k: _Shape(s) for k, s in shapes.items()})
    assert infer_config({k: _Shape(s) for k, s in shapes.items()}, num_heads=4).num_heads == 4


def test_not_a_controlnet_is_named():
    with pytest.raises(WeightMappingError, match="not a ControlNet"):
        layout_of(["transformer_blocks.0.attn.to_q.weight"])


def test_joint_controlnet_without_context_is_refused():
    net = load_controlnet(to_mx(joint_controlnet().state_dict()))
    x = inputs()
    tokens = net.embed_latents(nchw_to_nhwc(x["latents"]))
    with pytest.raises(InputError, match="context"):
        net(tokens, nchw_to_nhwc(x["control"]), mx.array(x["timestep"].numpy()), mx.array(x["pooled"].numpy()))


# ---- residual rules in the transformer ----
def _residual_inputs(depth_cn: int, n_tokens: int, batch=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n_tokens, HIDDEN, generator=g) for _ in range(depth_cn)]


@pytest.mark.parametrize("rule", ["diffusers", "stability"])
@pytest.mark.parametrize("depth,n_outputs", [(4, 2), (4, 4), (3, 1)])
def test_residual_rules_in_the_transformer(rule, depth, n_outputs):
    """diffusers' rule against SD3Transformer2DModel itself; Stability's as the same forward
    with a hook adding the last block's residual too (mmditx.py adds after every block)."""
    main = transformer(depth=depth)
    main_mx = load_mmdit(to_mx(main.state_dict()), MMDIT_DIFFUSERS)
    x = inputs()
    n_tokens = (8 // 2) * (12 // 2)
    res = _residual_inputs(n_outputs, n_tokens)
    handle = None
    if rule == "stability":
        last = main.transformer_blocks[-1]
        k = (depth - 1) // (depth // n_outputs)

        def add_last(module, args, output):
            enc, hid = output
            return enc, hid + res[k]

        handle = last.register_forward_hook(add_last)
    try:
        with torch.no_grad():
            expected = main(hidden_states=x["latents"], encoder_hidden_states=x["context"],
                            pooled_projections=x["pooled"], timestep=x["timestep"],
                            block_controlnet_hidden_states=res, return_dict=False)[0]  # fmt: skip
    finally:
        if handle is not None:
            handle.remove()
    chosen = STABILITY_RULE if rule == "stability" else DIFFUSERS_RULE
    residuals = block_residuals([(chosen, [mx.array(r.numpy()) for r in res])], depth)
    ours = main_mx(nchw_to_nhwc(x["latents"]), mx.array(x["timestep"].numpy()), mx.array(x["context"].numpy()),
                   mx.array(x["pooled"].numpy()), residuals=residuals)  # fmt: skip
    err = rel_err(to_numpy(ours), expected.numpy().transpose(0, 2, 3, 1))
    assert err <= TOL, f"max|Δ|/max|ref| = {err:.2e}"


def test_rules_differ_exactly_in_the_last_block():
    outs = [mx.full((1, 1, 1), float(k + 1)) for k in range(19)]
    s = block_residuals([(STABILITY_RULE, outs)], 38)
    d = block_residuals([(DIFFUSERS_RULE, outs)], 38)
    assert [float(r.item()) for r in s] == [float(j // 2 + 1) for j in range(38)]
    assert d[-1] is None and [float(r.item()) for r in d[:-1]] == [float(j // 2 + 1) for j in range(37)]
    # skip-layer guidance: Stability adds nothing to a skipped block, diffusers still does
    assert block_residuals([(STABILITY_RULE, outs)], 38, skip_layers=(7,))[7] is None
    assert block_residuals([(DIFFUSERS_RULE, outs)], 38, skip_layers=(7,))[7] is not None
    # two ControlNets add up
    both = block_residuals([(STABILITY_RULE, outs), (DIFFUSERS_RULE, outs)], 38)
    assert float(both[0].item()) == 2.0 and float(both[-1].item()) == 19.0
