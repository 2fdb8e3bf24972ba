"""distill.runner: side-by-side stages are pinned to their own cores, and a failure names its stage."""

import os
import sys

import pytest

from distill.errors import DistillError
from distill.runner import run_side_by_side, split_cores

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")

SHOW = "import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])"


def test_split_cores_halves_disjoint():
    cores = sorted(os.sched_getaffinity(0))
    halves = split_cores(2)
    if len(cores) < 2:
        assert halves is None
        return
    a, b = halves
    assert len(a) == len(b) == len(cores) // 2 and not set(a) & set(b) and set(a) | set(b) <= set(cores)


def test_side_by_side_pins_each_stage(tmp_path):
    halves = split_cores(2)
    if halves is None:
        pytest.skip("one core")
    stages = [(f"s{i}", [sys.executable, "-c", SHOW], tmp_path / f"s{i}.log") for i in range(2)]
    run_side_by_side(stages, halves)
    for i in range(2):
        assert (tmp_path / f"s{i}.log").read_text().split("\n")[0] == f"{halves[i]} {len(halves[i])}"


def test_side_by_side_failure_names_stage(tmp_path):
    halves = split_cores(2) or [[0], [0]]
    stages = [("good", [sys.executable, "-c", "pass"], tmp_path / "g.log"),
              ("bad", [sys.executable, "-c", "raise SystemExit('boom')"], tmp_path / "b.log")]
    with pytest.raises(DistillError, match="stage 'bad' failed .*boom"):
        run_side_by_side(stages, halves)
