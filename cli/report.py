"""Rendering of artifacts and results for people (rich tables) and scripts (JSON)."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from rich.console import Console, Group
from rich.table import Table

from alvts_calib.model import Diagnosis

console = Console(width=None if sys.stdout.isatty() else 140)  # pipes and logs get whole tables


def print_json(payload: Any) -> None:
    """Machine-readable output on stdout (NaN becomes null)."""
    print(json.dumps(_finite(payload), indent=2, sort_keys=True))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _mean(values: list[float]) -> float:
    finite = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def fidelity_table(fidelity: dict[str, dict[str, float]], keep_ratios: dict[str, float] | None = None) -> Table:
    """Per-layer held-out fidelity, with the mean as the last row."""
    table = Table(title="per-layer selector fidelity (held-out) and how much each layer changes the hidden states")
    table.add_column("layer", justify="right")
    if keep_ratios:
        table.add_column("keep ratio", justify="right")
    columns = {
        "recall": "top-k recall", "spearman": "spearman", "mass": "importance mass kept",
        "update_explained": "skip-update R²", "text_update": "text update", "visual_update": "visual update",
    }
    columns = {key: title for key, title in columns.items() if all(key in f for f in fidelity.values())}
    for title in columns.values():
        table.add_column(title, justify="right")
    for layer in sorted(fidelity, key=int):
        ratio = [f"{keep_ratios[layer]:.3f}"] if keep_ratios else []
        table.add_row(layer, *ratio, *(_number(fidelity[layer][key]) for key in columns))
    ratio = [_number(_mean([float(r) for r in keep_ratios.values()]))] if keep_ratios else []
    table.add_row("mean", *ratio, *(_number(_mean([f[key] for f in fidelity.values()])) for key in columns))
    return table


def _number(value: float | None) -> str:
    """Three decimals (small values in scientific notation); NaN (a layer keeping no visual token has no top-k
    recall) or None shows as '-'."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.1e}" if 0 < abs(value) < 0.01 else f"{value:.3f}"


def budget_description(metadata: dict[str, Any]) -> str:
    """One line on how a selector artifact spreads visual tokens over its routed layers."""
    allocation = metadata.get("allocation")
    pooled = ", skipped tokens pooled into one stand-in" if metadata.get("skipped_keys") == "pool" else ""
    if metadata.get("skipped_update", "none") != "none":
        pooled += f", skipped update {metadata['skipped_update']}"
    if metadata["budget"] == "uniform" or allocation is None:
        return f"uniform keep ratio {metadata.get('keep_ratio')}{pooled}"
    return (
        f"adaptive ({allocation['method']}): mean {allocation['mean_tokens_per_layer']:.2f} of "
        f"{allocation['visual_tokens']} visual tokens per routed layer (uniform keep ratio "
        f"{allocation['target_keep_ratio']} gives {allocation['uniform_tokens_per_layer']}), "
        f"mean keep ratio {allocation['mean_keep_ratio']:.4f}{pooled}"
    )


def key_value_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(key, _plain(value))
    return table


def _plain(value: Any, indent: str = "") -> str:
    """A value for people: an object as one `key: value` line per entry (nested ones indented), None as '-'."""
    if isinstance(value, dict):
        lines = [f"{indent}{key}: {_plain(item)}" if not isinstance(item, dict) else
                 f"{indent}{key}:\n{_plain(item, indent + '  ')}" for key, item in value.items()]
        return "\n".join(lines) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(_plain(item) for item in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)


def doctor_tables(diagnosis: Diagnosis) -> Group:
    """Versions, GPUs, attention backends and model families, one table each."""
    versions = key_value_table("versions", {k: v or "not installed" for k, v in diagnosis.versions.items()})
    gpus = Table(title=f"GPUs (CUDA {diagnosis.cuda_version or 'not in this torch build'})")
    for column in ("index", "name", "memory GiB", "capability", "bf16"):
        gpus.add_column(column)
    for gpu in diagnosis.gpus:
        gpus.add_row(str(gpu.index), gpu.name, f"{gpu.memory_gib:.1f}", gpu.capability, "yes" if gpu.bf16 else "no")
    if not diagnosis.gpus:
        gpus.add_row("-", "no CUDA GPU available (CPU only)", "", "", "")
    backends = Table(title="attention backends")
    for column in ("backend", "usable", "why"):
        backends.add_column(column)
    for backend in diagnosis.attention_backends:
        backends.add_row(backend.name, "yes" if backend.usable else "no", backend.reason)
    families = key_value_table("model families", {"supported": ", ".join(diagnosis.families)})
    return Group(versions, gpus, backends, families)


EVAL_COLUMNS = ("method", "target", "measured compression", "visual tokens / layer", "accuracy", "retention",
                "FLOPs vs full", "selector recall")


def _target(row: dict[str, Any]) -> str:
    target = row["target_compression"]
    return "-" if target is None else f"{target:.0%}"


def _eval_cells(row: dict[str, Any]) -> list[str]:
    return [
        row["method"],
        _target(row),
        f"{row['compression']:.1%}",
        f"{row['visual_tokens_per_layer']:.1f}",
        f"{row['accuracy']:.1%}",
        "-" if not math.isfinite(row["retention"]) else f"{row['retention']:.1%}",
        f"{row['flops_ratio']:.2f}",
        _number(row["mean_recall"]),
    ]


def eval_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Accuracy, retention, measured compression and FLOPs per method and budget."""
    table = Table(title=title)
    for column in EVAL_COLUMNS:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(*_eval_cells(row))
    return table


def _kinds(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({kind for row in rows for kind in row.get("accuracy_by_kind", {})})


def _kind_cells(row: dict[str, Any], kinds: list[str]) -> list[str]:
    by_kind = row.get("accuracy_by_kind", {})
    return [row["method"], _target(row),
            *(f"{by_kind[kind]:.1%}" if kind in by_kind else "-" for kind in kinds)]


def kind_table(rows: list[dict[str, Any]], title: str) -> Table | None:
    """Accuracy per kind of row (the data's `kind` column) per method and budget; None without kinds."""
    kinds = _kinds(rows)
    if not kinds:
        return None
    table = Table(title=title)
    for column in ("method", "target", *kinds):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(*_kind_cells(row, kinds))
    return table


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"


def eval_markdown(rows: list[dict[str, Any]]) -> str:
    """The evaluation table as Markdown (for docs/RESULTS.md), then the per-kind accuracy table if rows have kinds."""
    text = _markdown(list(EVAL_COLUMNS), [_eval_cells(row) for row in rows])
    kinds = _kinds(rows)
    if kinds:
        text += "\n" + _markdown(["method", "target", *kinds], [_kind_cells(row, kinds) for row in rows])
    return text
