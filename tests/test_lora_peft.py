"""diffusers / PEFT LoRAs against diffusers' own `load_lora_weights` + `set_adapters` on
`StableDiffusion3Pipeline`: two LoRAs (rank 4 alpha 6, rank 16 alpha 8) at different weights on
the transformer (every Linear kind: both streams, MMDiT-X attn2, adaLN incl. the two half-swapped
modulations, the embedders, the final layer) and both CLIPs; final latents and single networks."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest
import torch
import transformers.integrations.peft as transformers_peft
from lora_files import write_peft_lora
from reference import rel_err, to_numpy
from test_pipeline import H, NEGATIVE, PROMPT, W, final_latents, noise_pair, reference_latents
from tiny_model import TinySpec, make_tiny_model

from sd35_mlx.pipeline import SD35Pipeline
from sd35_mlx.settings import GenerationSettings

TOL = 1e-4
WEIGHTS = {"a": 0.7, "b": 1.3}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # transformers 5.24 asks for peft >= 0.22 (not on PyPI here); 0.21's API is what it calls
    patch = pytest.MonkeyPatch()
    patch.setattr(transformers_peft, "check_peft_version", lambda **kw: None)
    root = tmp_path_factory.mktemp("tiny_sd3_lora")
    pipe = make_tiny_model(root, TinySpec())
    files = {
        "a": write_peft_lora(pipe, root / "loras" / "a.safetensors", rank=4, alpha=6, seed=1),
        "b": write_peft_lora(pipe, root / "loras" / "b.safetensors", rank=16, alpha=8, seed=2),
    }
    from diffusers import StableDiffusion3Pipeline

    ref = StableDiffusion3Pipeline.from_pretrained(root)
    for name, path in files.items():
        ref.load_lora_weights(str(path), adapter_name=name)
    ref.set_adapters(list(WEIGHTS), list(WEIGHTS.values()))
    yield root, files, ref
    patch.undo()


def ours_with_loras(root: Path, files, **kw) -> SD35Pipeline:
    pipe = SD35Pipeline.from_pretrained(root, dtype=mx.float32, **kw)
    for name, path in files.items():
        pipe.load_lora(path, scale=WEIGHTS[name], name=name)
    return pipe


def test_final_latents_match_diffusers(setup):
    root, files, ref = setup
    pipe = ours_with_loras(root, files)
    assert {l.name for l in pipe.loras} == {"a", "b"}
    assert all(set(l.components) == {"transformer", "clip_l", "clip_g"} for l in pipe.loras)
    noise, noise_t = noise_pair(23)
    s = GenerationSettings(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, steps=2, cfg=4.0,
                           sampler="euler", t5_length=77)  # fmt: skip
    ref_lat = reference_latents(ref, noise_t, prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=2,
                                guidance_scale=4.0, max_sequence_length=77)  # fmt: skip
    ours = final_latents(pipe, s, noise)
    err = rel_err(to_numpy(ours), to_numpy(ref_lat).transpose(0, 2, 3, 1))
    assert err <= TOL, err
    # the LoRAs matter: without them the latents differ clearly
    plain = SD35Pipeline.from_pretrained(root, dtype=mx.float32)
    assert rel_err(final_latents(plain, s, noise), ours) > 1e-2
    # and the run recorded them
    meta = pipe.metadata(pipe.settings_with_defaults(s))
    assert [(r["name"], r["scale"]) for r in meta["loras"]] == [("a", 0.7), ("b", 1.3)]
    assert all(len(r["sha256"]) == 64 for r in meta["loras"])


@torch.no_grad()
def test_each_network_matches_diffusers(setup):
    root, files, ref = setup
    pipe = ours_with_loras(root, files, low_memory=False)
    enc = pipe._load_encoders()
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])
    for ours, theirs in ((enc.clip_l, ref.text_encoder), (enc.clip_g, ref.text_encoder_2)):
        out = ours(mx.array(ids.numpy()))
        want = theirs(ids, output_hidden_states=True)
        assert rel_err(out.hidden, want.hidden_states[-2]) <= TOL
        assert rel_err(out.pooled, want.text_embeds) <= TOL
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 8, 12, generator=g)
    context = torch.randn(2, 7, 64, generator=g)
    pooled = torch.randn(2, 40, generator=g)
    t = torch.tensor([999.0, 250.0])
    want = ref.transformer(latents, context, pooled, t).sample
    got = pipe._load_transformer()(mx.array(latents.numpy()).transpose(0, 2, 3, 1), mx.array(t.numpy()),
                                   mx.array(context.numpy()), mx.array(pooled.numpy()))  # fmt: skip
    assert rel_err(to_numpy(got).transpose(0, 3, 1, 2), want) <= TOL


def test_switching_loras_needs_no_reload(setup):
    root, files, _ = setup
    pipe = ours_with_loras(root, files, low_memory=False)
    transformer = pipe._load_transformer()
    qkv = transformer.blocks[0].x.attn.qkv
    base_weight = qkv.weight
    pipe.set_lora_scales({"a": 0.0})
    pipe.unload_lora("b")
    assert pipe._load_transformer() is transformer and transformer.blocks[0].x.attn.qkv.weight is base_weight
    assert [l.name for l in pipe.loras] == ["a"]
    pipe.unload_lora()
    assert type(transformer.blocks[0].x.attn.qkv).__name__ == "Linear"  # plain layers again
