"""Where a routed prefill's extra time goes, by operator: one wide geometry (`speed_wide.WIDE`) on the CPU, one
compression, a routed runtime against its floor, each op's self CPU time (PyTorch profiler, grouped by op and input
shapes) in the routed prefill less the floor's, largest first. Complements `speed.py --wide`, whose columns are the
runtime's own steps.

    OMP_NUM_THREADS=1 python benchmarks/speed_ops.py [--model llava-1.5-7b-wide] [--compression 0.89] \
        [--method alvts-default] [--top 25] [--out docs/results/speed-ops-cpu.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from speed_measure import decoder_prefill
from speed_models import ModelSpec
from speed_wide import VARIANTS, WIDE, Run, WideSetup, attached_run
from torch.profiler import ProfilerActivity, profile


def op_milliseconds(model: torch.nn.Module, selector, run: Run, warmup: int = 1) -> dict[str, tuple[float, int]]:
    """Self CPU ms and calls of each (op, input shapes) in one prefill of `run`, after `warmup` untimed ones."""
    with attached_run(model, selector, run):
        for _ in range(warmup):
            decoder_prefill(model, run.decoder, routed=run.policies is not None)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
            decoder_prefill(model, run.decoder, routed=run.policies is not None)
    return {f"{event.key} {event.input_shapes}": (event.self_cpu_time_total / 1e3, event.count)
            for event in profiler.key_averages(group_by_input_shape=True)}


def op_differences(spec: ModelSpec, compression: float, method: str) -> dict[str, Any]:
    """Each op's self CPU ms in `method`'s routed prefill of the `spec` geometry and in its floor's, and the
    difference."""
    variant = next(variant for variant in VARIANTS if variant.method == method)
    setup = WideSetup.of(spec)
    count, (floor_run, routed_run) = setup.routed_runs(compression, (variant,))
    floor = op_milliseconds(setup.model, setup.selector, floor_run)
    routed = op_milliseconds(setup.model, setup.selector, routed_run)
    rows = [{"op": op, "floor_ms": floor.get(op, (0.0, 0))[0], "routed_ms": routed.get(op, (0.0, 0))[0],
             "calls": routed.get(op, (0.0, 0))[1]} for op in set(floor) | set(routed)]
    for row in rows:
        row["extra_ms"] = row["routed_ms"] - row["floor_ms"]
    rows.sort(key=lambda row: -row["extra_ms"])
    return {"model": spec.name, "compression": compression, "method": method, "visual_per_layer": count,
            "floor_total_ms": sum(ms for ms, _ in floor.values()),
            "routed_total_ms": sum(ms for ms, _ in routed.values()), "ops": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=WIDE[0].name, choices=[spec.name for spec in WIDE])
    parser.add_argument("--compression", type=float, default=0.89)
    parser.add_argument("--method", default=VARIANTS[-1].method, choices=[variant.method for variant in VARIANTS])
    parser.add_argument("--top", type=int, default=25, help="ops to print, largest extra time first")
    parser.add_argument("--out", type=Path, help="write every op's row as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = next(spec for spec in WIDE if spec.name == args.model)
    result = op_differences(spec, args.compression, args.method)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"{args.method} over its floor, {args.model} at {args.compression:.0%}: self CPU ms by op "
                        f"(totals {result['routed_total_ms']:.0f} and {result['floor_total_ms']:.0f})")
    for column in ("op (input shapes)", "floor ms", "routed ms", "extra ms", "calls"):
        table.add_column(column, justify="left" if column.startswith("op") else "right")
    for row in result["ops"][: args.top]:
        table.add_row(row["op"][:110], f"{row['floor_ms']:.1f}", f"{row['routed_ms']:.1f}", f"{row['extra_ms']:.1f}",
                      str(row["calls"]))
    Console(width=170).print(table)


if __name__ == "__main__":
    main()
