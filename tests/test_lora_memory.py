"""LoRAs under a memory budget: the plan holds their factors (denoise: the transformer's,
encode: the text encoders'), a LoRA the plan has no room for is refused and left unattached,
and unloading gives the room back (CPU, tiny model, the real pipeline)."""

from __future__ import annotations

import mlx.core as mx
import pytest
from lora_files import PEFT, dotted_key, linear_stems, random_lora, save
from tiny_model import TinySpec, make_tiny_model

from sd35_mlx.errors import InputError
from sd35_mlx.memory import plan_fits
from sd35_mlx.pipeline import SD35Pipeline

SIZE = (64, 64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_lora_memory")
    pipe = make_tiny_model(root, TinySpec(seed=3))
    state = pipe.transformer.state_dict()
    tensors, _ = random_lora(state, linear_stems(state), dotted_key("transformer."), suffixes=PEFT,
                             with_alpha=False, seed=1)  # fmt: skip
    clip = pipe.text_encoder.state_dict()  # CLIP-L too: the encode stage is this model's largest
    text, _ = random_lora(clip, linear_stems(clip), dotted_key("text_encoder."), suffixes=PEFT, with_alpha=False, seed=2)
    return root, save({**tensors, **text}, root / "loras" / "style.safetensors")


def _pipe(root, budget_bytes):
    return SD35Pipeline.from_pretrained(root, dtype=mx.float32, memory_budget=budget_bytes / 1e9, plan_size=SIZE)


def test_the_plan_holds_the_factors_and_gives_them_back(tiny):
    root, lora_file = tiny
    pipe = _pipe(root, 50e9)
    before = dict(pipe.plan.stages)
    lora = pipe.load_lora(str(lora_file))
    on_transformer, on_clip = (lora.factor_bytes(c, mx.float32) for c in ("transformer", "clip_l"))
    assert on_transformer > 0 and on_clip > 0
    assert pipe.plan.stages["denoise"] == before["denoise"] + on_transformer
    assert pipe.plan.stages["encode"] == before["encode"] + on_clip
    assert pipe.plan.stages["decode"] == before["decode"]
    pipe.unload_lora()
    assert pipe.plan.stages == before


def test_a_lora_without_room_is_refused_and_not_left_attached(tiny):
    root, lora_file = tiny
    base = _pipe(root, 50e9).plan
    lo, hi = 1, 50 * 10**9  # the smallest budget the plan itself fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if plan_fits(base, mid) else (mid + 1, hi)
    pipe = _pipe(root, lo + 1)
    assert pipe.plan.stages == base.stages  # the same plan, with no room to spare
    with pytest.raises(InputError, match="LoRAs' factors .* do not fit .*--fuse-lora"):
        pipe.load_lora(str(lora_file))
    assert pipe.loras == [] and pipe.plan.stages == base.stages
    # and the generation still runs as planned
    assert pipe.describe_plan()
