"""bench_run_length's split of a run's wall time into a once-per-run cost and a per-step cost
(checked against numpy's least-squares fit), and its refusal of run lengths that cannot be fitted."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_run_length as bench  # noqa: E402


def test_fit_recovers_an_exact_line():
    fixed, step = bench.fit({n: 0.007 + n * 0.0325 for n in (2, 6, 28)})
    assert fixed == pytest.approx(0.007, abs=1e-12)
    assert step == pytest.approx(0.0325, rel=1e-12)


def test_fit_matches_numpy_least_squares_on_noisy_walls():
    rng = np.random.default_rng(0)
    lengths = [1, 2, 6, 12, 28]
    walls = {n: 0.004 + 0.015 * n + float(rng.normal(0, 0.001)) for n in lengths}
    step, fixed = np.polyfit(lengths, [walls[n] for n in lengths], 1)
    got_fixed, got_step = bench.fit(walls)
    assert got_fixed == pytest.approx(fixed, rel=1e-9)
    assert got_step == pytest.approx(step, rel=1e-9)


@pytest.mark.parametrize("lengths", [["6"], ["6", "6"], ["0", "6"]])
def test_run_lengths_that_cannot_be_fitted_are_refused(lengths, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--run-lengths", *lengths])
    assert "--run-lengths" in capsys.readouterr().err


def test_run_lengths_are_parsed_once_into_sorted_distinct_counts():
    assert bench.parse_args(["--run-lengths", "28", "2", "6", "2"]).run_lengths == [2, 6, 28]
