"""Settle ALVTS's open design choices by measurement on the built-in demo model.

Three tables, printed and written as JSON:
1. stale states: for each runtime (budget x what processed tokens see of skipped ones) and each skipped-token
   update, retention and the KL divergence of the answer distribution from the full model's, with the selector
   and, for uniform budgets, the exact (oracle) selection;
2. budgets: uniform vs the adaptive allocations at every compression, with skipped keys dropped or pooled (each
   with the toolkit's skipped update for it: none when dropped, the stand-in's when pooled);
3. settings: each row calibrates with one setting changed from the defaults and reports the selector's held-out
   fidelity (mean top-k recall and importance mass kept over routed layers at the uniform budget), the skip
   update's R², the calibration time, and retention with the paper's runtime and with the toolkit's defaults
   (sensitivity budget, pooled keys, the stand-in update when the setting fits skip maps).

    python benchmarks/design_sweeps.py --out docs/results/design-sweeps.json --markdown docs/results/design-sweeps.md

(about 35 minutes on 2 CPU cores; `--render docs/results/design-sweeps.json` re-prints an earlier report).
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

from alvts_calib.artifact import SkippedKeys, SkippedUpdate, calibrated_layers, default_skipped_update
from alvts_calib.calibration import calibrate, input_device, kl_divergence, move
from alvts_calib.data import build_labelled_items, build_samples
from alvts_calib.demo import BUILTIN_NAME, builtin_model, builtin_processor, split_records
from alvts_calib.evaluation import Harness, Plan, build_plans, reference_visual_count
from alvts_calib.runtime import KeepAllPolicy, attach_policies, detach

UPDATES = ("none", "mean", "linear", "stand-in", "exact")  # exact: a bound, what stale states cost
POOLED_UPDATES = ("stand-in",)  # passes on the pooled stand-in's update, so not offered with dropped keys
KEYS = ("drop", "pool")
BUDGETS = ("uniform", "adaptive", "adaptive-mass", "adaptive-update", "sensitivity")
POOLED_ONLY = ("sensitivity",)  # measured with the pooled stand-in, so not offered with dropped keys
PAPER = ("uniform", "drop")  # the paper's runtime: one keep ratio, skipped tokens invisible
DEFAULT_RUNTIME = ("sensitivity", "pool")  # the toolkit's export defaults (with its default skipped update)
RUNTIMES = (PAPER, ("uniform", "pool"), ("adaptive-update", "pool"), DEFAULT_RUNTIME)
DEFAULTS = {"rank": None, "init": "weight_svd", "refine_steps": 200, "importance": "text", "start_layer": 0,
            "samples": 64, "skip_update_rank": 16, "refine_compressions": []}
SWEEPS = [
    ("defaults", {}),
    ("rank 16 (1 head)", {"rank": 16}),
    ("rank 64 (4 heads = full)", {"rank": 64}),
    ("init weight SVD, no refinement", {"refine_steps": 0}),
    ("init data SVD, no refinement", {"init": "data_svd", "refine_steps": 0}),
    ("init data SVD, refined", {"init": "data_svd"}),
    ("importance paper (S_V2V x S_T2V)", {"importance": "paper"}),
    ("importance last token", {"importance": "last"}),
    ("start layer 1", {"start_layer": 1}),
    ("start layer 2", {"start_layer": 2}),
    ("16 calibration samples", {"samples": 16}),
    ("256 calibration samples", {"samples": 256}),
    ("skip-update rank 0 (no fitted map: update none)", {"skip_update_rank": 0}),
    ("skip-update rank 4", {"skip_update_rank": 4}),
    ("skip-update rank 64 (full)", {"skip_update_rank": 64}),
    ("split refined jointly at 89%", {"refine_compressions": [0.89]}),
]


def _runtime_name(runtime: tuple[str, str]) -> str:
    return f"{runtime[0]} / {runtime[1]}"


class Sweeper:
    """The demo model, its held-out set and full-model reference, shared by every table."""

    def __init__(self, eval_rows: int):
        self.model = builtin_model()
        self.processor = builtin_processor()
        items, _ = build_labelled_items(split_records("test", eval_rows), self.processor)
        self.items = items
        self.harness = Harness(self.model, self.processor, items, batch_size=64, progress=False)
        self.full = self.harness.run(None, "full", None)
        self.num_visual = reference_visual_count(self.full)
        self.num_layers = self.harness.geometry.num_layers
        self.records = split_records("calibration", 256)
        self.reference_logits = self.answer_log_probs(None)
        self.calibrations: dict[str, tuple] = {}

    def calibrate(self, settings: dict):
        """The calibration with `settings` and its time (each setting calibrated once per run)."""
        key = json.dumps(settings, sort_keys=True)
        if key not in self.calibrations:
            self.calibrations[key] = self._calibrate(settings)
        return self.calibrations[key]

    def _calibrate(self, settings: dict):
        samples, _ = build_samples(self.records, self.processor, num_samples=settings["samples"])
        started = time.perf_counter()
        calibration = calibrate(
            self.model, samples, rank=settings["rank"], init=settings["init"], refine_steps=settings["refine_steps"],
            importance=settings["importance"], start_layer=settings["start_layer"],
            skip_update_rank=settings["skip_update_rank"], refine_compressions=settings["refine_compressions"],
            progress=False,
        )
        return calibration, time.perf_counter() - started

    def retention(self, plan: Plan | None, update: str, selector) -> float:
        """Accuracy / full accuracy under `plan` (NaN for a budget the plan cannot meet)."""
        if plan is None:
            return float("nan")
        self.harness.skipped_update, self.harness.selector = SkippedUpdate(update), selector
        return self.harness.run(plan, plan.method, None).accuracy / self.full.accuracy

    def plan(self, method: str, compression: float, selector, calibration, runtime: tuple[str, str] = PAPER):
        """`method` ("alvts" or "oracle") at `compression` under `runtime` (budget, skipped keys)."""
        budget, keys = runtime
        if method == "alvts" and budget == "uniform":
            method = "alvts-uniform"
        return build_plans(method, compression, num_layers=self.num_layers, num_visual=self.num_visual,
                           selector=selector, calibration=calibration, skipped_keys=keys, budget=budget)

    def answer_log_probs(self, plan: Plan | None, update: str = "none", selector=None) -> torch.Tensor:
        """(N, V) log-probabilities of the first answer token for every held-out item under `plan`."""
        policies = {} if plan is None else dict(plan.policies)
        for index in range(self.num_layers):
            policies.setdefault(index, KeepAllPolicy())
        keys = "drop" if plan is None else plan.skipped_keys
        attach_policies(self.model, policies, selector=selector, skipped_update=update, skipped_keys=keys)
        rows = []
        try:
            for start in range(0, len(self.items), 64):
                batch = self.items[start : start + 64]
                inputs = self.processor(images=[i.image for i in batch], text=[i.text for i in batch], padding=True,
                                        return_tensors="pt")
                with torch.no_grad():
                    logits = self.model(**move(dict(inputs), input_device(self.model)), logits_to_keep=1).logits
                rows.append(logits[:, -1].float().log_softmax(-1).cpu())
        finally:
            detach(self.model)
        return torch.cat(rows)

    def kl(self, plan: Plan, update: str, selector) -> float:
        """Mean KL(full || routed) of the answer distribution."""
        routed = self.answer_log_probs(plan, update, selector)
        reference = self.reference_logits
        return float(kl_divergence(reference, routed).mean())


def default_update(keys: str, selector) -> str:
    """The skipped update the toolkit uses with `keys` and `selector` (`artifact.default_skipped_update`)."""
    return default_skipped_update(SkippedKeys(keys), selector.has_skip_updates).value


def _fidelity_columns(fidelity: dict | None, suffix: str) -> dict[str, float]:
    """Recall, mass kept and skip-update R² (NaN where the budget cannot be met)."""
    fidelity = fidelity or {}
    return {f"{key}{suffix}": fidelity.get(key, float("nan")) for key in ("recall", "mass", "update_explained")}


def settings_table(sweeper: Sweeper, compression: float, quick: bool) -> list[dict]:
    rows = []
    for name, change in SWEEPS[:3] if quick else SWEEPS:
        settings = {**DEFAULTS, **change}
        calibration, seconds = sweeper.calibrate(settings)
        selector = calibrated_layers(calibration)
        plan, fidelity = sweeper.plan("alvts", compression, selector, calibration)
        default_plan, default_fidelity = sweeper.plan("alvts", compression, selector, calibration, DEFAULT_RUNTIME)
        row = {"setting": name, **settings, "calibration_seconds": seconds, **_fidelity_columns(fidelity, ""),
               **_fidelity_columns(default_fidelity, "_defaults"),
               "retention_paper": sweeper.retention(plan, "none", selector),
               "retention_defaults": sweeper.retention(
                   default_plan, default_update(DEFAULT_RUNTIME[1], selector), selector)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def budgets_table(sweeper: Sweeper, compressions: tuple[float, ...]) -> list[dict]:
    calibration, _ = sweeper.calibrate(DEFAULTS)
    selector = calibrated_layers(calibration)
    rows = []
    for compression in compressions:
        for keys in KEYS:
            row = {"compression": compression, "skipped_keys": keys}
            for budget in BUDGETS:
                if keys == "drop" and budget in POOLED_ONLY:
                    continue
                plan, _ = sweeper.plan("alvts", compression, selector, calibration, (budget, keys))
                row[f"retention_{budget}"] = sweeper.retention(plan, default_update(keys, selector), selector)
                row[f"tokens_{budget}"] = statistics.fmean(plan.planned_tokens)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def stale_table(sweeper: Sweeper, compression: float) -> list[dict]:
    calibration, _ = sweeper.calibrate(DEFAULTS)
    selector = calibrated_layers(calibration)
    cases = [("alvts", runtime) for runtime in RUNTIMES] + [("oracle", ("uniform", keys)) for keys in KEYS]
    rows = []
    for method, runtime in cases:
        plan, _ = sweeper.plan(method, compression, selector, calibration, runtime)
        for update in UPDATES:
            if runtime[1] == "drop" and update in POOLED_UPDATES:
                continue
            row = {"selection": method, "runtime": _runtime_name(runtime), "update": update,
                   "retention": sweeper.retention(plan, update, selector), "kl": sweeper.kl(plan, update, selector)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def run(compression: float, eval_rows: int, quick: bool) -> dict:
    """All three tables; returns the JSON report."""
    sweeper = Sweeper(eval_rows)
    report = {"model": BUILTIN_NAME, "compression": compression, "eval_rows": eval_rows,
              "full_accuracy": sweeper.full.accuracy, "threads": torch.get_num_threads()}
    report["stale_states"] = stale_table(sweeper, compression)
    report["budgets"] = budgets_table(sweeper, (0.67, 0.78, 0.89))
    report["settings"] = settings_table(sweeper, compression, quick)
    return report


def _percent(value: float) -> str:
    return "infeasible" if value != value else f"{value:.1%}"


def _fraction(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"


def tables(report: dict) -> list[Table]:
    title = f"on {report['model']}, {report['eval_rows']} held-out rows (full accuracy {report['full_accuracy']:.1%})"
    settings = Table(title=f"design settings at {report['compression']:.0%} compression {title}")
    columns = ("setting", "recall (uniform)", "mass kept (uniform)", "skip-update R²", "retention (paper runtime)",
               "recall (defaults)", "retention (defaults)", "calibration s")
    for column in columns:
        settings.add_column(column, justify="left" if column == "setting" else "right")
    for row in report["settings"]:
        settings.add_row(row["setting"], _fraction(row["recall"]), _fraction(row["mass"]),
                         _fraction(row["update_explained"]), _percent(row["retention_paper"]),
                         _fraction(row["recall_defaults"]), _percent(row["retention_defaults"]),
                         f"{row['calibration_seconds']:.1f}")
    budgets = Table(title=f"per-layer budgets {title}")
    for column in ("compression", "skipped keys", *(f"retention ({b})" for b in BUDGETS)):
        budgets.add_column(column, justify="right")
    for row in report["budgets"]:
        budgets.add_row(_percent(row["compression"]), row["skipped_keys"],
                        *(_percent(row[f"retention_{b}"]) if f"retention_{b}" in row else "-" for b in BUDGETS))
    stale = Table(title=f"skipped tokens at {report['compression']:.0%} compression {title}")
    for column in ("selection", "budget / skipped keys", "update", "retention", "answer KL from full"):
        stale.add_column(column, justify="right")
    for row in report["stale_states"]:
        stale.add_row(row["selection"], row["runtime"], row["update"], _percent(row["retention"]), f"{row['kl']:.4f}")
    return [stale, budgets, settings]


def markdown(report: dict) -> str:
    """The three tables as Markdown (what docs/DESIGN.md quotes)."""
    lines = []
    for table in tables(report):
        lines += [f"**{table.title}**", ""]
        lines.append("| " + " | ".join(str(column.header) for column in table.columns) + " |")
        lines.append("|" + "---|" * len(table.columns))
        for row in zip(*(column._cells for column in table.columns), strict=True):
            lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", type=float, default=0.89)
    parser.add_argument("--eval-rows", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="Only the first three setting rows (development).")
    parser.add_argument("--out", type=Path, default=Path("docs/results/design-sweeps.json"))
    parser.add_argument("--markdown", type=Path, help="Also write the tables as Markdown to this file.")
    parser.add_argument("--render", type=Path, help="Print (and --markdown) the tables of an earlier JSON report.")
    args = parser.parse_args()
    if args.render is not None:
        report = json.loads(args.render.read_text(encoding="utf-8"))
    else:
        report = run(args.compression, args.eval_rows, args.quick)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
        print(f"-> {args.out}")
    for table in tables(report):
        Console().print(table)
    if args.markdown is not None:
        args.markdown.write_text(markdown(report), encoding="utf-8")


if __name__ == "__main__":
    main()
