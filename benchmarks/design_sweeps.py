"""Settle ALVTS's open design choices by measurement on the built-in demo model.

Each row calibrates with one setting changed from the defaults, then reports the selector's held-out fidelity
(mean top-k recall and importance mass kept across routed layers, at the evaluated keep ratio) and the demo
accuracy retention at one compression. Prints a table and writes JSON:

    python benchmarks/design_sweeps.py --out docs/design-sweeps.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from alvts_calib.builtin import BUILTIN_NAME, builtin_model, builtin_processor
from alvts_calib.data import build_labelled_items, build_samples
from alvts_calib.evaluation import Harness, build_plans, reference_visual_count
from alvts_calib.export import build_selector
from alvts_calib.pipeline import calibrate
from alvts_calib.shapes_task import split_records

DEFAULTS = {"rank": None, "init": "weight_svd", "refine_steps": 200, "importance": "paper", "start_layer": 1,
            "samples": 64}
SWEEPS = [
    ("defaults", {}),
    ("rank 16 (1 head)", {"rank": 16}),
    ("rank 64 (4 heads = full)", {"rank": 64}),
    ("init weight SVD, no refinement", {"refine_steps": 0}),
    ("init data SVD, no refinement", {"init": "data_svd", "refine_steps": 0}),
    ("init data SVD, refined", {"init": "data_svd"}),
    ("importance text-to-visual", {"importance": "text"}),
    ("importance last token", {"importance": "last"}),
    ("start layer 2", {"start_layer": 2}),
    ("start layer 4", {"start_layer": 4}),
    ("16 calibration samples", {"samples": 16}),
    ("256 calibration samples", {"samples": 256}),
]


def run(compression: float, eval_rows: int, quick: bool) -> dict:
    """Calibrate and evaluate every sweep row; returns the JSON report."""
    model = builtin_model()
    processor = builtin_processor()
    items, _ = build_labelled_items(split_records("test", eval_rows), processor)
    harness = Harness(model, processor, items, batch_size=64)
    full = harness.run(None, "full", None)
    num_visual = reference_visual_count(full)
    records = split_records("calibration", 256)
    rows = []
    for name, change in SWEEPS[:3] if quick else SWEEPS:
        settings = {**DEFAULTS, **change}
        samples, _ = build_samples(records, processor, num_samples=settings["samples"])
        started = time.perf_counter()
        calibration = calibrate(
            model, samples, rank=settings["rank"], init=settings["init"], refine_steps=settings["refine_steps"],
            importance=settings["importance"], start_layer=settings["start_layer"], progress=False,
        )
        seconds = time.perf_counter() - started
        selector = build_selector(calibration, keep_ratio=1.0)
        row = {"setting": name, **settings, "calibration_seconds": seconds}
        for skipped_update in ("none", "mean"):
            harness.skipped_update = skipped_update
            plan, fidelity = build_plans("alvts", compression, num_layers=harness.geometry.num_layers,
                                         num_visual=num_visual, selector=selector, calibration=calibration)
            result = harness.run(plan, name, compression)
            row[f"retention_{skipped_update}"] = result.accuracy / full.accuracy
            row.update({"recall": fidelity["recall"], "mass": fidelity.get("mass", float("nan"))})
        rows.append(row)
        print(json.dumps(row), flush=True)
    harness.skipped_update = "none"
    oracle, _ = build_plans("oracle", compression, num_layers=harness.geometry.num_layers, num_visual=num_visual,
                            selector=selector)
    oracle_result = harness.run(oracle, "oracle", compression)
    return {"model": BUILTIN_NAME, "compression": compression, "eval_rows": eval_rows,
            "full_accuracy": full.accuracy, "oracle_retention": oracle_result.accuracy / full.accuracy,
            "threads": torch.get_num_threads(), "rows": rows}


def table(report: dict) -> Table:
    result = Table(title=f"design sweeps on {report['model']} at {report['compression']:.0%} compression "
                         f"(full accuracy {report['full_accuracy']:.1%}, oracle retention "
                         f"{report['oracle_retention']:.1%})")
    for column in ("setting", "recall", "mass kept", "retention (skip)", "retention (mean update)", "calibration s"):
        result.add_column(column, justify="left" if column == "setting" else "right")
    for row in report["rows"]:
        result.add_row(row["setting"], f"{row['recall']:.3f}", f"{row['mass']:.3f}", f"{row['retention_none']:.1%}",
                       f"{row['retention_mean']:.1%}", f"{row['calibration_seconds']:.0f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", type=float, default=0.89)
    parser.add_argument("--eval-rows", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="Only the first three rows (development).")
    parser.add_argument("--out", type=Path, default=Path("docs/design-sweeps.json"))
    args = parser.parse_args()
    report = run(args.compression, args.eval_rows, args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    Console().print(table(report))
    print(f"mean recall over rows: {statistics.fmean(r['recall'] for r in report['rows']):.3f} -> {args.out}")


if __name__ == "__main__":
    main()
