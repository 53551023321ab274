"""The real-weight benchmark's tables: paired differences from a reference row, per compression, in the Markdown."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import real_weights  # noqa: E402


def _row(method: str, compression: float, kl: list[float]) -> dict:
    return {"method": method, "compression": compression, "measured_compression": compression, "flops_ratio": 0.5,
            "kl": sum(kl) / len(kl), "top1": 0.5, "kl_per_prompt": kl,
            "runtime": {"skipped_keys": "pool", "skipped_update": "linear"}}


def test_rows_are_paired_with_the_reference_at_their_own_compression():
    rows = [_row("ref", 0.67, [1.0, 2.0, 3.0]), _row("other", 0.67, [2.0, 2.0, 5.0]),
            _row("ref", 0.89, [4.0, 4.0, 4.0]), _row("other", 0.89, [3.0, 3.0, 3.0])]
    paired = real_weights.paired_with(rows, "ref")
    assert paired[0]["kl_vs_reference"] == (0.0, 0.0)
    mean, error = paired[1]["kl_vs_reference"]
    assert mean == pytest.approx(1.0) and error == pytest.approx((1.0 / 3) ** 0.5)  # differences 1, 0, 2
    assert paired[3]["kl_vs_reference"] == (pytest.approx(-1.0), pytest.approx(0.0))
    table = real_weights.markdown(paired, "ref")
    assert "KL vs ref (paired SE)" in table.splitlines()[0]
    assert "| 89% | other | 89.0% | 0.50 | 3.000 | 50.0% | pool / linear | -1.000 (0.000) |" in table
