"""The speed benchmark's core functions on a tiny geometry, one repetition: report structure and KV cache savings.

No timing assertions: speed targets live in the benchmark and docs/BENCHMARKS.md, not in tests.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import speed  # noqa: E402
import speed_wide  # noqa: E402
from speed_measure import Timing, capture_decoder_inputs  # noqa: E402
from speed_models import ModelSpec  # noqa: E402

from alvts_calib.runtime import ROUTED_RANGES  # noqa: E402

pytestmark = pytest.mark.slow  # the module's report runs the whole benchmark once (about 25 s on 2 CPU cores)

TINY = ModelSpec("llava-tiny", "llava", 64, 20, 2, 2, 128, 32064, 32, 1, 2, 64, 168)  # 144 visual tokens
ROW_KEYS = {
    "method", "compression", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_memory_bytes",
    "kv_bytes_per_layer", "kv_bytes", "prefill_speedup", "ttft_speedup", "decode_speedup",
    "ideal_prefill_speedup", "ideal_prefill_speedup_with_selection", "kv_routed_layers_reduction",
}
ROUTED_KEYS = {"selector_share", "gather_scatter_share", "stand_in_update_share", "host_syncs", "top_level_ops"}


@pytest.fixture(scope="module")
def report() -> dict:
    settings = speed.settings_for(small=True, device=torch.device("cpu"))
    settings = replace(settings, specs=(TINY,), batches=(1,), new_tokens=2, timing=Timing(0, 1),
                       decode_timing=Timing(0, 1))
    return {"models": [speed.benchmark_model(TINY, settings)]}


def test_report_structure(report):
    json.dumps(report)  # JSON-ready
    (run,) = report["models"][0]["runs"]
    assert run["visual_tokens"] == 144 and run["batch"] == 1
    methods = {(row["method"], row["compression"]) for row in run["rows"]}
    assert {("unpatched", None), ("alvts-keep-all", 0.0)} <= methods
    for compression in (0.67, 0.78, 0.89):
        assert {("alvts-default", compression), ("alvts-pooled", compression), ("alvts-uniform", compression),
                ("alvts-adaptive*", compression), ("fastv", compression), ("pyramiddrop", compression)} <= methods
    for row in run["rows"]:
        assert ROW_KEYS <= set(row), row["method"]
        assert len(row["kv_bytes_per_layer"]) == TINY.layers
        assert math.isfinite(row["prefill_ms"]) and row["prefill_ms"] > 0
        if row["compression"]:
            assert ROUTED_KEYS <= set(row)
            assert 0.0 < row["selector_share"] < 1.0 and 0.0 < row["gather_scatter_share"] < 1.0


def test_routed_kv_cache_is_smaller(report):
    rows = report["models"][0]["runs"][0]["rows"]
    base, keep_all = rows[0], rows[1]
    assert keep_all["kv_bytes"] == base["kv_bytes"]
    assert keep_all["ideal_prefill_speedup"] == pytest.approx(1.0)
    for row in rows[2:]:
        assert row["kv_bytes"] < base["kv_bytes"], row["method"]
        assert row["kv_routed_layers_reduction"] > 0.0
        assert row["ideal_prefill_speedup"] > 1.0
        assert row["ideal_prefill_speedup_with_selection"] < row["ideal_prefill_speedup"]  # selection costs FLOPs
    uniform = {row["compression"]: row for row in rows if row["method"] == "alvts-uniform"}
    assert uniform[0.89]["kv_bytes"] < uniform[0.78]["kv_bytes"] < uniform[0.67]["kv_bytes"]


def test_no_host_syncs_in_routed_alvts_layers(report):
    """One host read per pass (the context's counts); routed ALVTS layers add none."""
    rows = report["models"][0]["runs"][0]["rows"]
    assert all(row["host_syncs"] <= 1 for row in rows if row["method"] == "alvts-uniform")


def test_wide_report_compares_every_runtime_with_its_floor(monkeypatch):
    monkeypatch.setattr(speed_wide, "FULL_ROUNDS", 1)
    monkeypatch.setattr(speed_wide, "ROUTED_ROUNDS", 2)
    spec = replace(TINY, name="llava-tiny-wide", layers=4)
    result = speed_wide.benchmark_wide(spec)
    json.dumps(result)
    rows = result["rows"]
    assert [row["method"] for row in rows[:2]] == ["unpatched", "alvts-keep-all"]
    for compression in speed_wide.COMPRESSIONS:
        at = [row for row in rows if row["compression"] == compression]
        assert [row["method"] for row in at] == ["floor", *(variant.method for variant in speed_wide.VARIANTS)]
        count = at[0]["visual_per_layer"]
        assert count == math.floor((1 - compression) * result["visual_tokens"] + 1e-9)
        for row in at[1:]:
            low, high = row["floor_ratio_range"]
            assert low <= row["floor_ratio"] <= high and row["prefill_ms"] > 0
            assert set(row["ranges_ms"]) == set(ROUTED_RANGES) and row["ranges_ms"]["select"] > 0
            assert row["host_syncs"] == 1, "one host read per pass, none per routed layer"
        default = at[-1]["ranges_ms"]
        assert default["pool"] > 0 and default["update"] > 0
        shares = {row["method"]: row["matmul_share"] for row in at[1:]}
        assert 0 < shares["alvts-paper"] == shares["alvts-pooled"] < shares["alvts-default"]  # the map's matmuls
    table = speed_wide.markdown_wide([result])
    assert "| steps / floor | matmuls / floor |" in table
    assert len(re.findall(r"\| [0-9.]+% \| [0-9.]+% \|$", table, flags=re.MULTILINE)) == 3 * len(speed_wide.VARIANTS)


def test_floor_inputs_keep_the_text_and_the_first_visual_tokens():
    from speed_models import build_inputs, build_model, visual_mask

    model = build_model(TINY, "sdpa", torch.device("cpu"), torch.float32)
    inputs = build_inputs(TINY, model, 1, torch.device("cpu"), torch.float32)
    visual = visual_mask(TINY, inputs)
    decoder = capture_decoder_inputs(model, inputs, visual)
    floor = speed_wide.floor_inputs(decoder, 10)
    text = int((~visual).sum())
    assert floor.kwargs["inputs_embeds"].shape[1] == text + 10 and int(floor.visual.sum()) == 10
    kept = (~visual[0]) | (visual[0].cumsum(0) <= 10)
    assert torch.equal(floor.kwargs["inputs_embeds"][0], decoder.kwargs["inputs_embeds"][0][kept])


def test_op_breakdown_lists_what_the_routed_prefill_adds_over_its_floor():
    import speed_ops

    result = speed_ops.op_differences(replace(TINY, name="llava-tiny-wide", layers=4), 0.89, "alvts-default")
    json.dumps(result)
    extra = [row["extra_ms"] for row in result["ops"]]
    assert extra == sorted(extra, reverse=True)
    ops = {row["op"].split(" ")[0] for row in result["ops"] if row["floor_ms"] == 0 and row["routed_ms"] > 0}
    assert {"alvts.select", "alvts.update", "aten::baddbmm"} <= ops  # the runtime's own steps, the floor has none
