"""How each budget's split does with every layer routed at once, on calibration-style samples of both surfaces.

The sensitivity budget measures each layer routed alone and splits the tokens by dynamic programming; the other
budgets read the full attention's statistics. This checks the splits where they are used, with every layer routed:
the mean KL divergence of the next token from the unrouted model's (`calibration.joint_search.joint_divergences`,
pooled keys and the default update), at 67/78/89% compression, on three groups of samples:
- `measured`: the samples the sensitivity was measured on (a split may fit them);
- `calibration`: other samples the calibration solved its selectors on;
- `unseen`: samples the calibration never saw.

Surfaces: the built-in demo (the shipped default calibration, artifacts/demo-calibration.safetensors: 64 samples,
all measured; unseen are calibration-split rows 64-192) and the real-weight surface of `real_weights.py`
(SmolLM2-135M-Instruct, the default calibration on 24 passages with sensitivity measured on 2; unseen are further
passages of the same documents, 24-56). One next token per sample, so it is noisier per sample than the real-weight
evaluation's 16-token continuations, but it runs on many more samples.

    python benchmarks/budget_splits.py --out docs/results/budget-splits.json --markdown docs/results/budget-splits.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from alvts_calib.artifact import (
    Budget,
    Calibration,
    SkippedKeys,
    allocate,
    calibrated_layers,
    default_skipped_update,
    load_calibration,
)
from alvts_calib.calibration import joint_divergences

COMPRESSIONS = (0.67, 0.78, 0.89)
BUDGETS = (Budget.SENSITIVITY, Budget.UNIFORM, Budget.ADAPTIVE_MASS, Budget.ADAPTIVE, Budget.ADAPTIVE_UPDATE)
DEMO_CALIBRATION = Path("artifacts/demo-calibration.safetensors")
DEMO_UNSEEN = (64, 192)  # calibration-split rows the demo's default calibration (64 rows) never read
REAL_PASSAGES = 56  # 24 for the calibration (2 measured), the rest unseen


def splits(calibration: Calibration, compression: float) -> dict[str, tuple[int, ...]]:
    """Each budget's tokens per routed layer (stand-in included) at `compression`, as export allocates them."""
    statistics, visual_tokens = calibration.budget_statistics()
    result = {}
    for budget in BUDGETS:
        if budget is Budget.UNIFORM:
            continue
        result[budget.value] = tuple(allocate(statistics, 1.0 - compression, visual_tokens, budget, pooled=True)
                                     .tokens.values())
    total = sum(result[Budget.SENSITIVITY.value])
    result[Budget.UNIFORM.value] = (total // len(statistics),) * len(statistics)
    return result


def measure(model, calibration: Calibration, groups: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """One row per compression and sample group: each budget's joint next-token KL."""
    selector = calibrated_layers(calibration)
    update = default_skipped_update(SkippedKeys.POOL, selector.has_skip_updates)
    _, visual_tokens = calibration.budget_statistics()
    objectives = {name: joint_divergences(model, samples, selector, visual_tokens, update)
                  for name, samples in groups.items()}
    rows = []
    for compression in COMPRESSIONS:
        candidates = splits(calibration, compression)
        for name, objective in objectives.items():
            values = objective(list(candidates.values()))
            rows.append({"compression": compression, "samples": name, "count": len(groups[name]),
                         "kl": dict(zip(candidates, values, strict=True))})
    return rows


def demo_surface() -> dict[str, Any]:
    from alvts_calib.data import build_samples
    from alvts_calib.demo import builtin_model, builtin_processor, split_records

    calibration = load_calibration(DEMO_CALIBRATION)
    measured = calibration.metadata["summary"]["sensitivity_samples"]
    samples, _ = build_samples(split_records("calibration", DEMO_UNSEEN[1]), builtin_processor(),
                               num_samples=DEMO_UNSEEN[1])
    groups = {"measured": samples[:measured], "unseen": samples[DEMO_UNSEEN[0]:]}
    return {"surface": "demo", "rows": measure(builtin_model(), calibration, groups)}


def real_surface() -> dict[str, Any]:
    import real_weights

    surface = real_weights.load_surface(REAL_PASSAGES, 1, 1, 2)
    calibration, _ = surface.calibration(24)
    measured = calibration.metadata["summary"]["sensitivity_samples"]
    samples = surface.calibration_samples
    groups = {"measured": samples[:measured], "calibration": samples[measured:24], "unseen": samples[24:]}
    return {"surface": "real weights (SmolLM2-135M)", "rows": measure(surface.model, calibration, groups)}


def markdown(results: list[dict[str, Any]]) -> str:
    names = [budget.value for budget in BUDGETS]
    lines = ["| surface | compression | samples | " + " | ".join(names) + " |",
             "|---|---:|---|" + "---:|" * len(names)]
    for result in results:
        for row in result["rows"]:
            best = min(row["kl"].values())
            cells = [f"**{row['kl'][name]:.3f}**" if row["kl"][name] == best else f"{row['kl'][name]:.3f}"
                     for name in names]
            lines.append(f"| {result['surface']} | {row['compression']:.0%} | {row['samples']} ({row['count']}) | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--surfaces", default="demo,real", help="comma-separated: demo, real")
    parser.add_argument("--out", type=Path, help="write the results as JSON")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown")
    args = parser.parse_args()
    runs = {"demo": demo_surface, "real": real_surface}
    results = [runs[name]() for name in args.surfaces.split(",")]
    table = Table(title="joint next-token KL of each budget's split (lower is better)")
    for column in ("surface", "compression", "samples", *(budget.value for budget in BUDGETS)):
        table.add_column(column)
    for result in results:
        for row in result["rows"]:
            table.add_row(result["surface"], f"{row['compression']:.0%}", f"{row['samples']} ({row['count']})",
                          *(f"{row['kl'][budget.value]:.3f}" for budget in BUDGETS))
    Console().print(table)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(results))


if __name__ == "__main__":
    main()
