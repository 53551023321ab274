"""The calibration benchmark on a tiny geometry: every phase timed, the FLOP model counted and extrapolated.

No timing assertions: the numbers live in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import calibration_speed  # noqa: E402
from speed_models import ModelSpec  # noqa: E402

TINY = ModelSpec("llava-tiny", "llava", 64, 4, 2, 2, 128, 32064, 32, 1, 2, 64, 112)  # 64 visual tokens


@pytest.fixture(scope="module")
def result():
    return calibration_speed.report(TINY, layers=2, samples=3, sensitivity_samples=1, device=torch.device("cpu"))


def test_every_phase_of_a_default_calibration_is_timed_and_counted(result):
    rows = {row["phase"]: row for row in result["measured"]}
    assert set(rows) == set(calibration_speed.PHASES)
    for name in ("capture", "solve", "skip maps", "skip-map fit", "sensitivity"):
        assert rows[name]["seconds"] > 0 and rows[name]["model_flops"] > 0, name
    assert rows["refinement"]["seconds"] == 0 and rows["propagate"]["seconds"] == 0  # off / start layer 0
    assert result["total_seconds"] == pytest.approx(sum(row["seconds"] for row in result["measured"]))
    budgets = result["metadata"]["run"]["budgets"]
    assert len(budgets) == 2 and all(4 <= count <= 12 for count in budgets)  # coarse grid at least, full at most


def test_the_flop_model_extrapolates_to_the_full_default_workload(result):
    full = result["full_depth"]
    workload = full["workload"]
    assert (workload["layers"], workload["samples"], workload["sensitivity_samples"]) == (4, 256, 64)
    assert list(workload["budgets"]) == [full["grid_budgets"]] * 4
    assert full["h200_total_minutes"] * 60 == pytest.approx(sum(full["h200_seconds"].values()))
    more = calibration_speed.phase_flops(TINY, calibration_speed.Workload(**{**workload, "sensitivity_samples": 128,
                                                                               "budgets": tuple(workload["budgets"])}))
    assert more["sensitivity"] == pytest.approx(2 * full["flops"]["sensitivity"])  # linear in the samples
    assert more["capture"] == full["flops"]["capture"]
