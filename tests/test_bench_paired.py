"""bench_paired's rounds (every runner once a round, the order rotating, a warm-up round left
out), its pairings (ours against the strongest diffusers runner, quantized against bf16), ratios
taken within a round, and its refusal of settings with nothing to pair."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_paired as bench  # noqa: E402


def runner(label, bits=None, diffusers=None, calls=None):
    def run(n):
        if calls is not None:
            calls.append(label)
        return n

    return bench.Runner(label, run, lambda _: None, bits=bits, diffusers=diffusers)


def test_every_round_runs_every_runner_once_in_a_rotating_order():
    calls = []
    runners = [runner(x, calls=calls) for x in "abc"]
    rounds = bench.run_rounds(runners, steps=3, rounds=3)
    assert len(rounds) == 3 and all(set(r) == {"a", "b", "c"} for r in rounds)
    assert calls == list("abc" "bca" "cab" "abc")  # the first round is the untimed warm-up


def test_settling_runs_precede_each_timed_run_untimed():
    calls = []
    rounds = bench.run_rounds([runner(x, calls=calls) for x in "ab"], steps=1, rounds=1, settle=2)
    assert len(rounds) == 1
    assert calls == list("aaabbb" "bbbaaa")


def test_ours_pair_with_compiled_diffusers_and_quantized_with_bf16():
    ours16, ours4 = runner("ours bf16", bits=16), runner("ours 4-bit", bits=4)
    eager, compiled = runner("eager", diffusers="eager"), runner("compiled", diffusers="compiled")
    pairs = [(a.label, b.label) for a, b in bench.pairings([ours16, ours4, eager, compiled])]
    assert pairs == [("ours bf16", "compiled"), ("ours 4-bit", "compiled"), ("ours 4-bit", "ours bf16")]
    assert [(a.label, b.label) for a, b in bench.pairings([ours16, eager])] == [("ours bf16", "eager")]


def test_ratios_are_taken_within_each_round():
    runners = [runner("ours", bits=16), runner("theirs", diffusers="compiled")]
    # the host slows down by 2x between rounds; within a round ours is always 0.8x theirs
    rounds = [{"ours": 0.8 * s, "theirs": s} for s in (0.010, 0.020, 0.015)]
    summary = bench.summarise(runners, rounds)
    ratio = summary["ratios"]["ours / theirs"]
    assert ratio["median"] == pytest.approx(0.8) and ratio["min"] == pytest.approx(0.8)
    assert ratio["max"] == pytest.approx(0.8)
    assert summary["step_s"] == {"ours": pytest.approx(0.012), "theirs": pytest.approx(0.015)}


@pytest.mark.parametrize("argv", [["--bits", "16"], ["--steps", "0", "--torch"], ["--bits", "3", "--torch"], ["--settle", "-1", "--torch"]])
def test_settings_with_nothing_to_pair_or_to_run_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert "--" in capsys.readouterr().err


def test_bits_are_ordered_bf16_first():
    assert bench.parse_args(["--bits", "4", "16", "4"]).bits == [16, 4]
