"""The converter's folder swap survives SIGKILL at every point and never deletes the only copy.

A child process replaces a folder through `atomic_folder` and kills itself (SIGKILL: no
cleanup runs) just before or just after each filesystem step of `_swap_in`, or halfway
through deleting the replaced folder. The next `check_target` must then find the target
holding either the complete old content or the complete new one, and nothing left beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sd35_mlx.errors import InputError
from sd35_mlx.weights.converted import FORMAT, atomic_folder, check_target

ROOT = Path(__file__).resolve().parents[1]
CONFIG = '{"format": "%s", "format_version": 1, "components": {}}' % FORMAT

CHILD = textwrap.dedent(
    """
    import os, shutil, signal, sys
    from pathlib import Path
    from sd35_mlx.weights import converted

    target, point = Path(sys.argv[1]), sys.argv[2]
    calls = {"n": 0}

    def kill_at(name, real):
        def wrapped(*a, **k):
            calls["n"] += 1
            label = f"{name}{calls['n']}"
            if point == "before-" + label:
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*a, **k)
            if point == "after-" + label:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapped

    converted.os.replace = kill_at("replace", os.replace)
    real_rmtree = shutil.rmtree

    def half_rmtree(path, *a, **k):  # delete one file, then die
        if point == "during-rmtree":
            next(Path(path).glob("*")).unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmtree(path, *a, **k)

    converted.shutil.rmtree = half_rmtree
    with converted.atomic_folder(target, force=True) as tmp:
        (tmp / "config.json").write_text(sys.argv[3])
        for i in range(3):
            (tmp / f"new-{i}.safetensors").write_text("new")
    """
)

# replace1: target -> .old, replace2: tmp -> target, replace3: .old -> .trash
POINTS = ["before-replace1", "after-replace1", "after-replace2", "after-replace3", "during-rmtree", "none"]


def _old_model(target: Path) -> None:
    target.mkdir()
    (target / "config.json").write_text(CONFIG)
    for i in range(3):
        (target / f"old-{i}.safetensors").write_text("old")


def _content(target: Path) -> set:
    return {p.name for p in target.iterdir()}


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_anywhere_in_the_swap_loses_nothing(point, tmp_path):
    target = tmp_path / "model-mlx"
    _old_model(target)
    old = _content(target)
    new = {"config.json"} | {f"new-{i}.safetensors" for i in range(3)}
    r = subprocess.run([sys.executable, "-c", CHILD, str(target), point, CONFIG], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == (0 if point == "none" else -9), r.stderr
    check_target(target, force=True)  # what the next conversion does first
    assert _content(target) in (old, new), point
    if point in ("before-replace1", "after-replace1"):
        assert _content(target) == old  # killed before the new folder was in place: the old one is back
    else:
        assert _content(target) == new
    assert [p.name for p in tmp_path.iterdir()] == ["model-mlx"], "nothing left beside the target"


def test_a_live_conversions_folders_are_left_alone(tmp_path):
    target = tmp_path / "m"
    _old_model(target)
    mine = tmp_path / f".m.tmp-{os.getppid()}"  # a running process (our parent)
    mine.mkdir()
    check_target(target, force=True)
    assert mine.is_dir()


def test_without_force_a_restored_folder_is_still_protected(tmp_path):
    target = tmp_path / "m"
    aside = tmp_path / ".m.old-999999999"  # no such process: killed between the renames
    _old_model(aside)
    with pytest.raises(InputError, match="already exists"):
        check_target(target, force=False)
    assert (target / "config.json").is_file() and not aside.exists()


def test_failure_inside_the_block_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "m"
    _old_model(target)
    before = _content(target)
    with pytest.raises(RuntimeError):
        with atomic_folder(target, force=True) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("disk full")
    assert _content(target) == before and [p.name for p in tmp_path.iterdir()] == ["m"]
