"""The budget-split benchmark's core: every budget's split spends the same tokens, and the joint measure runs on the
demo (two samples, no timing or ranking assertions: results live in docs/DESIGN.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import budget_splits  # noqa: E402

from alvts_calib.artifact import load_calibration  # noqa: E402
from alvts_calib.data import build_samples  # noqa: E402
from alvts_calib.demo import builtin_model, builtin_processor, split_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("compression", budget_splits.COMPRESSIONS)
def test_every_budget_spends_the_same_tokens(compression):
    calibration = load_calibration(ROOT / budget_splits.DEMO_CALIBRATION)
    splits = budget_splits.splits(calibration, compression)
    assert set(splits) == {budget.value for budget in budget_splits.BUDGETS}
    totals = {name: sum(split) for name, split in splits.items()}
    assert len(set(totals.values())) == 1, totals
    assert len(set(splits["uniform"])) == 1
    assert splits["sensitivity"] != splits["uniform"]


def test_the_joint_measure_gives_one_row_per_compression_and_group():
    calibration = load_calibration(ROOT / budget_splits.DEMO_CALIBRATION)
    samples, _ = build_samples(split_records("calibration", 2), builtin_processor(), num_samples=2)
    rows = budget_splits.measure(builtin_model(), calibration, {"a": samples[:1], "b": samples[1:]})
    assert [(row["compression"], row["samples"]) for row in rows] == [
        (compression, group) for compression in budget_splits.COMPRESSIONS for group in ("a", "b")
    ]
    for row in rows:
        assert set(row["kl"]) == {budget.value for budget in budget_splits.BUDGETS}
        assert all(value >= 0 for value in row["kl"].values())
    assert "| demo | 89% | a (1) |" in budget_splits.markdown([{"surface": "demo", "rows": rows}])
