"""The pipeline's typed load plan: `quantize=` parsed once into QuantSpecs, a T5Mode, sources
resolved once, and the planner and the metadata told what is actually loaded."""

from __future__ import annotations

import mlx.core as mx
import pytest

from tiny_model import TinySpec, make_tiny_model

from sd35_mlx.components import T5Mode
from sd35_mlx.convert import convert
from sd35_mlx.errors import InputError
from sd35_mlx.pipeline import SD35Pipeline
from sd35_mlx.quantize import QuantSpec, make_spec, named_quantization, quantization_text
from sd35_mlx.weights import safetensors_file
from sd35_mlx.weights.sources import resolve_sources


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_plan")
    make_tiny_model(root, TinySpec(seed=3))
    return root


@pytest.fixture(scope="module")
def converted_4bit(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "tiny-4bit"
    return convert(str(tiny), str(out), dtype="float32", quantize="transformer=4:32,t5=none", quiet=True)


def test_quantize_text_is_parsed_once_into_specs(tiny):
    pipe = SD35Pipeline.from_pretrained(tiny, dtype=mx.float32, quantize="transformer=4:32")
    assert pipe.quantization == {"transformer": make_spec("transformer", 4, 32)}
    assert pipe.quantize == "transformer=4:32" and pipe.t5_mode is T5Mode.LOADED
    s = pipe.settings_with_defaults(pipe_settings())
    assert pipe.metadata(s)["quantization"] == "transformer=4:32"
    # the same as a mapping of QuantSpecs; a malformed text fails before anything loads
    same = SD35Pipeline.from_pretrained(tiny, dtype=mx.float32, quantize={"transformer": make_spec("transformer", 4, 32)})
    assert same.quantization == pipe.quantization
    with pytest.raises(InputError, match="component=value"):
        SD35Pipeline.from_pretrained("/nonexistent/model", quantize="transformer4")


def pipe_settings():
    from sd35_mlx.settings import GenerationSettings

    return GenerationSettings(prompt="a fox", width=32, height=32, steps=1)


def test_text_round_trips():
    for text in ("transformer=4", "transformer=8:32,t5=16", "clip_g=mxfp4,t5=4", "none"):
        specs = named_quantization(text)
        assert named_quantization(quantization_text(specs)) == specs, text
    assert quantization_text({}) == "none"


def test_a_converted_4bit_folder_is_planned_and_recorded_as_stored(converted_4bit, caplog):
    stored = QuantSpec.from_dict(
        resolve_sources(converted_4bit).converted["components"]["transformer"]["quantization"]
    )
    assert (stored.bits, stored.group_size) == (4, 32)
    with caplog.at_level("WARNING", logger="sd35_mlx"):
        pipe = SD35Pipeline.from_pretrained(converted_4bit, dtype=mx.float32, memory_budget=100.0,
                                            quantize="transformer=8")  # fmt: skip
    assert "stored as 4-bit g32; using it as stored (not 8-bit)" in caplog.text
    assert pipe.plan.transformer_spec == stored and pipe.quantization["transformer"] == stored
    assert "transformer 4-bit g32" in pipe.describe_plan()
    assert pipe.metadata(pipe.settings_with_defaults(pipe_settings()))["quantization"].startswith("transformer=4:32")


def test_t5_drop_reaches_the_planner(tiny):
    pipe = SD35Pipeline.from_pretrained(tiny, dtype=mx.float32, t5=False, memory_budget=100.0)
    assert pipe.plan.t5 is T5Mode.DROPPED and pipe.t5_mode is T5Mode.DROPPED and not pipe.use_t5
    streamed = SD35Pipeline.from_pretrained(tiny, dtype=mx.float32, stream_t5=True, memory_budget=100.0)
    assert streamed.plan.t5 is T5Mode.STREAMED and streamed.stream_t5


def test_each_header_is_parsed_once(tiny):
    """Resolving the model, planning and loading every network parse each file's header once."""
    safetensors_file._read_header.cache_clear()
    pipe = SD35Pipeline.from_pretrained(tiny, dtype=mx.float32, memory_budget=100.0)
    pipe.generate(settings=pipe_settings(), seed=0)
    info = safetensors_file._read_header.cache_info()
    weight_files = [p for p in tiny.rglob("*.safetensors")]
    assert info.misses == len(weight_files) and info.hits > 0


def test_load_options_are_one_object_and_keywords_override_them(tiny):
    from sd35_mlx import LoadOptions

    base = LoadOptions(dtype=mx.float32, quantize="transformer=8")
    pipe = SD35Pipeline.from_pretrained(tiny, base, quantize="transformer=4:32", t5=False)
    assert pipe.options.dtype == mx.float32 and not pipe.use_t5
    assert pipe.quantization == {"transformer": make_spec("transformer", 4, 32)}
    with pytest.raises(TypeError, match="unknown option.*quantise.*the options are dtype"):
        SD35Pipeline.from_pretrained(tiny, quantise="transformer=4")
