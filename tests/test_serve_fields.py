"""The server's request table and its model residency policy, without a server."""

from __future__ import annotations

from dataclasses import fields

import pytest

from sd35_mlx.serve.errors import RequestError
from sd35_mlx.serve.fields import FIELDS, parse_request
from sd35_mlx.serve.models import ModelRegistry
from sd35_mlx.settings import GenerationSettings, SkipLayerSettings

FULL = {
    "prompt": "a fox", "negative_prompt": "fog", "size": "96x64", "n": 2, "steps": 7, "cfg": 4, "seed": 11,
    "sampler": "dpmpp_2m", "shift": 2.5, "t5_length": 128, "model": "m", "stream": True, "partial_images": 1,
    "skip_layer_guidance": {"layers": [7, 8], "scale": 2.0, "start": 0.05, "end": 0.3},
    "response_format": "b64_json", "output_format": "png", "user": "someone", "quality": "high", "background": "auto",
}  # fmt: skip
EXPECTED = GenerationSettings(
    prompt="a fox", negative_prompt="fog", width=96, height=64, steps=7, cfg=4.0, seed=11, sampler="dpmpp_2m",
    shift=2.5, t5_length=128, skip_layer_guidance=SkipLayerSettings((7, 8), 2.0, 0.05, 0.3),
)  # fmt: skip


def test_every_settings_row_names_a_settings_field_and_every_field_is_reachable():
    names = {f.name for f in fields(GenerationSettings)}
    targets = {f.to for f in FIELDS.values() if f.to}
    assert targets <= names
    # width/height come from `size`, init_image and mask only from uploaded files (never from a value);
    # ControlNets need the operator to name their models first (not served yet)
    assert names - targets == {"width", "height", "init_image", "mask", "controlnets"}


def test_a_json_body_maps_onto_the_settings():
    r = parse_request(FULL, "generations")
    assert r.settings == EXPECTED
    assert (r.model, r.n, r.size, r.stream, r.partial_images) == ("m", 2, (96, 64), True, 1)


def test_form_texts_map_onto_the_same_settings():
    form = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in FULL.items()}
    form["skip_layer_guidance"] = '{"layers": [7, 8], "scale": 2.0, "start": 0.05, "end": 0.3}'
    form["strength"] = "0.4"
    r = parse_request(form, "edits")
    assert r.settings == EXPECTED.__class__(**{**EXPECTED.__dict__, "strength": 0.4})


def test_null_means_default_and_edit_only_fields_are_refused_on_generations():
    assert parse_request({"prompt": "x", "steps": None, "size": None}, "generations").settings == GenerationSettings("x")
    with pytest.raises(RequestError, match="unknown parameter 'strength'"):
        parse_request({"prompt": "x", "strength": 0.5}, "generations")
    assert parse_request({"prompt": "x", "skip_layer_guidance": True}, "generations").settings.skip_layer_guidance == SkipLayerSettings()


class FakePipeline:
    def __init__(self, name, memory):
        self.name, self.memory, self.released = name, memory, 0

    def release(self):
        self.released += 1
        self.memory["active"] -= self.memory[self.name]


def test_least_recently_used_models_are_released_to_stay_within_the_budget():
    memory = {"active": 0, "a": 6, "b": 5, "c": 3}
    pipes = {}

    def load(name):
        pipes[name] = FakePipeline(name, memory)
        return pipes[name]

    registry = ModelRegistry(load, ["a"], allowed=["b", "c"], budget_bytes=10, active_bytes=lambda: memory["active"])
    registry.prepare_started()

    def run(name):
        registry.prepare(name)
        before = registry.before_run(name)
        if not registry.models[name].resident:
            memory["active"] += memory[name]  # the generation loads its networks
        registry.after_run(name, before)

    run("a")
    run("c")  # 6 + 3 fit
    assert (registry.models["a"].resident_bytes, registry.models["c"].resident_bytes) == (6, 3)
    run("b")  # 6 + 3 + 5 do not: the least recently used other (a) is released
    assert [pipes[n].released for n in "abc"] == [1, 0, 0] and memory["active"] == 8
    run("a")  # a (6, measured) needs room: c, then b (freeing c alone leaves 5 + 6 > 10)
    assert [pipes[n].released for n in "abc"] == [1, 1, 1] and memory["active"] == 6
    assert [m.id for m in registry.models.values() if m.resident] == ["a"]
    run("a")
    assert pipes["a"].released == 1  # what runs is never released


def test_requests_can_name_only_served_models():
    registry = ModelRegistry(lambda name: FakePipeline(name, {}), ["a"], allowed=["b"])
    assert registry.resolve(None) == "a" and registry.resolve("b") == "b"
    with pytest.raises(RequestError) as e:
        registry.resolve("stabilityai/stable-diffusion-3.5-large")
    assert e.value.status == 404 and e.value.code == "model_not_found"
    assert registry.prepared("b") is None  # allow-listed models wait for their first request


def test_docs_list_every_request_field():
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text()
    rows = [line.split("|")[1] for line in page.splitlines() if line.startswith("| `")]
    missing = [name for name in FIELDS if not any(f"`{name}`" in row for row in rows)]
    assert not missing, f"docs/serving.md does not document: {missing}"


def test_a_warm_up_makes_a_started_model_resident_and_measured():
    memory = {"active": 0, "a": 4}

    def warm_up(pipe):
        memory["active"] += memory[pipe.name]

    registry = ModelRegistry(lambda name: FakePipeline(name, memory), ["a"], budget_bytes=10,
                             active_bytes=lambda: memory["active"], warm_up=warm_up)  # fmt: skip
    assert registry.prepared("a") is None
    registry.prepare_started()
    entry = registry.models["a"]
    assert entry.resident and entry.resident_bytes == 4 and registry.prepared("a").released == 0
