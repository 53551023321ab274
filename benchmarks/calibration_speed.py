"""Calibration time per phase at real layer width, and a FLOP model of the default calibration at full depth.

Runs `alvts_calib.calibrate` (default options) on a LLaVA-1.5-7B geometry with random weights (hidden 4096, 32 heads,
MLP 11008, CLIP ViT-L/336 tower: 576 visual + 60 text tokens) cut to a few decoder layers, and times each phase it
marks (`alvts_calib.progress.phase`: capture, solve, skip maps and their fit, sensitivity, refinement). On the CPU
it runs in float32 on one thread and times with the thread's CPU clock (as benchmarks/speed.py); on a GPU in bf16
with the wall clock. It counts the same phases' FLOPs (`alvts_calib.evaluation` flops for the layers), checks the
count against the measured times (FLOP rate per phase), and extrapolates to the full model: 32 layers, 256 samples,
64 of them measured for sensitivity, at the stated share of an H200's peak (ASSUMPTIONS).

Usage:
    python benchmarks/calibration_speed.py --out docs/results/calibration-speed-cpu.json      # CPU, 2 layers
    python benchmarks/calibration_speed.py --layers 32 --samples 256 --out calibration-speed-h200.json  # GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.console import Console
from rich.table import Table
from speed_models import FULL, TEXT_TOKENS, ModelSpec, build_inputs, build_model, model_config

import alvts_calib
from alvts_calib.calibration import REFINE_STEPS, SENSITIVITY_SAMPLES, budget_grid
from alvts_calib.evaluation import attention_flops, layer_flops, projection_flops
from alvts_calib.model import AttentionGeometry
from alvts_calib.progress import listening

PHASES = ("capture", "propagate", "solve", "skip maps", "skip-map fit", "sensitivity", "refinement")
H200_BF16_DENSE = 989e12  # FLOP/s, dense bf16 tensor cores (spec sheet)
H200_FP32 = 67e12  # FLOP/s, float32 without tensor cores (the selector solve runs in float32)
ASSUMPTIONS = {  # achieved throughput on one H200 per phase, as a share of the peak that applies (stated, not measured)
    "bf16 matmul share of 989 TFLOPS": 0.4,  # decoder and vision layers on 636-token rows, several rows per batch
    "float32 share of 67 TFLOPS": 0.25,  # the selector solve: rank-256 projections and scores, many small steps
    "host float64 FLOP/s": 200e9,  # the skip-map fit (D x D solve and eigh in float64 on the host: 16 cores)
}


@dataclass(frozen=True)
class Workload:
    """What a calibration computes: model depth, samples, tokens, and the default options that cost FLOPs."""

    layers: int
    samples: int
    sensitivity_samples: int
    visual: int
    text: int
    budgets: tuple[int, ...]  # budgets measured for sensitivity, per layer
    rank: int
    refine_steps: int = REFINE_STEPS


class PhaseClock:
    """Time spent in each phase, exclusive of the phases nested in it (thread CPU time, or wall time on a GPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._stack: list[tuple[str, float]] = []

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return time.perf_counter()
        return time.thread_time()

    def __call__(self, name: str, entering: bool) -> None:
        if entering:
            self._stack.append((name, self._now()))
            return
        started_name, started = self._stack.pop()
        assert started_name == name, (started_name, name)
        elapsed = self._now() - started
        self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
        if self._stack:  # exclusive times: the parent loses what its child spent
            parent = self._stack[-1][0]
            self.seconds[parent] = self.seconds.get(parent, 0.0) - elapsed


def vision_flops(spec: ModelSpec, tokens: int) -> float:
    """One image through the CLIP tower (bidirectional attention, two-matrix MLP) and the two-layer projector."""
    geometry = AttentionGeometry(spec.vision_layers, spec.vision_hidden, spec.vision_heads, spec.vision_heads,
                                 spec.vision_hidden // spec.vision_heads)
    per_layer = layer_flops(tokens, geometry, spec.vision_intermediate * 2 / 3) + attention_flops(tokens, geometry)
    return spec.vision_layers * per_layer + 2.0 * tokens * (spec.vision_hidden * spec.hidden + spec.hidden ** 2)


def selector_flops(tokens: int, hidden: int, rank: int) -> float:
    """One forward pass of a layer's selector: rank-`rank` queries and keys of every token, and their scores."""
    return 2.0 * tokens * hidden * 2 * rank + 2.0 * rank * tokens * tokens


def phase_flops(spec: ModelSpec, work: Workload) -> dict[str, float]:
    """FLOPs of each phase of a default calibration (start layer 0, no refinement) of `work` on `spec`."""
    geometry = AttentionGeometry.of_config(model_config(spec, "sdpa"))
    tokens, hidden, layers = work.visual + work.text, spec.hidden, work.layers
    layer = layer_flops(tokens, geometry, spec.intermediate)
    image = vision_flops(spec, work.visual + 1)  # CLIP adds its class token
    unit = projection_flops(geometry, spec.intermediate)
    importance = tokens * (unit["q"] + unit["kv"]) + attention_flops(tokens, geometry) / 2  # queries, keys, QK^T
    train = work.samples - max(1, round(work.samples * 0.125)) if work.samples > 1 else 1
    solve = work.samples * importance + (3 * work.refine_steps + 2 * train + work.samples) * selector_flops(
        tokens, hidden, work.rank)
    moments = 2.0 * 2 * work.visual * hidden * hidden  # x^T x and x^T y of the visual tokens
    swept = sum(count * (layers - index) for index, count in enumerate(work.budgets))  # rows x layers of sweeps
    head = 2.0 * hidden * spec.vocab
    sensitivity = work.sensitivity_samples * (
        image + (2 * layers - 1) * layer + swept * layer + (1 + sum(work.budgets)) * head)
    return {
        "capture": work.samples * image,
        "solve": layers * solve,
        "skip maps": layers * work.samples * (layer + moments),
        "skip-map fit": layers * 16.0 * hidden ** 3,  # float64 on the host: solve, two products and eigh of D x D
        "sensitivity": sensitivity,
    }


def h200_seconds(flops: dict[str, float]) -> dict[str, float]:
    """The implied time of each phase on one H200 at the ASSUMPTIONS' throughputs."""
    bf16 = H200_BF16_DENSE * ASSUMPTIONS["bf16 matmul share of 989 TFLOPS"]
    rates = {"solve": H200_FP32 * ASSUMPTIONS["float32 share of 67 TFLOPS"],
             "skip-map fit": ASSUMPTIONS["host float64 FLOP/s"]}
    return {name: value / rates.get(name, bf16) for name, value in flops.items()}


def measure(spec: ModelSpec, samples: int, sensitivity_samples: int, device: torch.device,
            dtype: torch.dtype) -> dict[str, Any]:
    """Calibrate `spec` on `samples` synthetic prompts with default options; seconds per phase and what it did."""
    model = build_model(spec, "sdpa", device, dtype)
    data = [build_inputs(spec, model, 1, device, dtype, seed=seed) for seed in range(samples)]
    clock = PhaseClock(device)
    with listening(clock):
        calibration = alvts_calib.calibrate(model, data, sensitivity_samples=sensitivity_samples, progress=False)
    budgets = [len(result.budget.damage_budgets) for result in calibration.layers.values()
               if result.budget.damage_budgets is not None]
    return {"seconds": {name: clock.seconds.get(name, 0.0) for name in PHASES}, "rank": calibration.rank,
            "visual_tokens": int(calibration.metadata["summary"]["visual_tokens"]),
            "budgets_measured": budgets}


def report(full: ModelSpec, layers: int, samples: int, sensitivity_samples: int,
           device: torch.device) -> dict[str, Any]:
    """Measure a calibration of `full` cut to `layers` decoder layers, and model the default one of `full`."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = replace(full, layers=layers)
    measured = measure(spec, samples, sensitivity_samples, device, dtype)
    visual = measured["visual_tokens"]
    run = Workload(layers, samples, sensitivity_samples, visual, TEXT_TOKENS,
                   tuple(measured["budgets_measured"]) or (0,) * layers, measured["rank"])
    run_flops = phase_flops(spec, run)
    phases = [{"phase": name, "seconds": measured["seconds"][name], "model_flops": run_flops.get(name, 0.0),
               "flop_rate": run_flops.get(name, 0.0) / measured["seconds"][name] if measured["seconds"][name] else None}
              for name in PHASES]
    grid = len(budget_grid(visual))
    target = Workload(full.layers, 256, SENSITIVITY_SAMPLES, visual, TEXT_TOKENS, (grid,) * full.layers,
                      measured["rank"])
    full_flops = phase_flops(full, target)
    full_seconds = h200_seconds(full_flops)
    return {
        "metadata": {
            "date": datetime.date.today().isoformat(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "dtype": str(dtype).removeprefix("torch."),
            "clock": "wall" if device.type == "cuda" else "thread-cpu",
            "geometry": asdict(spec), "run": asdict(run),
        },
        "measured": phases,
        "total_seconds": sum(row["seconds"] for row in phases),
        "full_depth": {
            "model": full.name, "workload": asdict(target), "grid_budgets": grid,
            "note": "sensitivity counted at the full grid for every layer: an upper bound, the adaptive grid measures "
                    "fewer; refinement is off by default",
            "flops": full_flops, "h200_seconds": full_seconds, "h200_total_minutes": sum(full_seconds.values()) / 60,
            "assumptions": {**ASSUMPTIONS, "h200_bf16_dense": H200_BF16_DENSE, "h200_fp32": H200_FP32},
        },
    }


def print_report(result: dict[str, Any], console: Console) -> None:
    metadata = result["metadata"]
    run = metadata["run"]
    table = Table(title=f"calibrate: {run['layers']} layers of {metadata['geometry']['name']}, {run['samples']} "
                        f"samples ({run['sensitivity_samples']} for sensitivity), {metadata['device']} "
                        f"{metadata['dtype']}")
    for column in ("phase", "seconds", "model GFLOP", "GFLOP/s"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for row in result["measured"]:
        rate = "-" if row["flop_rate"] is None else f"{row['flop_rate'] / 1e9:.1f}"
        table.add_row(row["phase"], f"{row['seconds']:.1f}", f"{row['model_flops'] / 1e9:.0f}", rate)
    console.print(table)
    full = result["full_depth"]
    table = Table(title=f"FLOP model: default calibration of {full['model']} ({full['workload']['layers']} layers, "
                        f"{full['workload']['samples']} samples, {full['workload']['sensitivity_samples']} for "
                        f"sensitivity, {full['grid_budgets']} budgets) on one H200")
    for column in ("phase", "PFLOP", "H200 seconds"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for name, flops in full["flops"].items():
        table.add_row(name, f"{flops / 1e15:.2f}", f"{full['h200_seconds'][name]:.0f}")
    table.add_row("total", f"{sum(full['flops'].values()) / 1e15:.2f}", f"{full['h200_total_minutes'] * 60:.0f}")
    console.print(table)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the measured model (default 2)")
    parser.add_argument("--samples", type=int, default=4, help="calibration samples (default 4)")
    parser.add_argument("--sensitivity-samples", type=int, default=1, help="of them measured for sensitivity")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # all compute on the timed thread: the thread-cpu clock then counts all of it
    full = next(spec for spec in FULL if spec.name == "llava-1.5-7b")
    result = report(full, args.layers, args.samples, args.sensitivity_samples, device)
    print_report(result, Console())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
