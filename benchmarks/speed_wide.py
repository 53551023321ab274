"""`speed.py --wide`: the routed runtime at real layer width on the CPU, against the cost floor of its budget.

A few decoder layers at LLaVA-1.5-7B and Qwen2.5-VL-7B width (random weights; a token vision tower), 576 visual and
about 60 text tokens, every decoder layer routed at 67/78/89% compression. Each routed variant is compared with its
floor: the unpatched layers run on the text and as many visual tokens as the variant processes per layer (what any
static pruning at that budget costs at least). Prefill of the decoder stack alone, thread CPU time with one intra-op
thread; the runs compared take turns round by round, and each ratio is the median of the per-round ratios. Where a
routed prefill's time goes comes from the runtime's profiler ranges (`alvts_calib.runtime.ROUTED_RANGES`) in a
few more prefills (each step's median over them); what lies outside them is the decoder layers' own work.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from speed_measure import DecoderInputs, capture_decoder_inputs, decoder_prefill, range_seconds
from speed_methods import weight_svd_selector
from speed_models import FULL, ModelSpec, build_inputs, build_model, visual_mask

from alvts_calib.artifact import Selector, SkippedKeys, SkippedUpdate, default_skipped_update
from alvts_calib.evaluation import alvts_plan, layer_flops
from alvts_calib.model import AttentionGeometry
from alvts_calib.runtime import SelectorPolicy, attach_policies, detach

WIDE_LAYERS = 4
_TOKEN_VISION = dict(vision_hidden=64, vision_layers=1, vision_heads=2, vision_intermediate=128)
WIDE = (
    replace(FULL[0], name="llava-1.5-7b-wide", layers=WIDE_LAYERS, **_TOKEN_VISION),
    replace(FULL[2], name="qwen2.5-vl-7b-wide", layers=WIDE_LAYERS, **_TOKEN_VISION),
)
COMPRESSIONS = (0.67, 0.78, 0.89)
FULL_ROUNDS = 3  # timed rounds of unpatched vs keep-all (each about 8 s at LLaVA-1.5-7B width)
ROUTED_ROUNDS = 5  # timed rounds of the floor and the routed runtimes at each compression
PROFILED_PREFILLS = 3  # profiled prefills per routed runtime; each step's time is their median


@dataclass(frozen=True)
class WideVariant:
    """One routed runtime at one compression: what skipped tokens leave for the text, and what they receive."""

    method: str
    skipped_keys: SkippedKeys
    skipped_update: SkippedUpdate


VARIANTS = (
    WideVariant("alvts-paper", SkippedKeys.DROP, SkippedUpdate.NONE),
    WideVariant("alvts-pooled", SkippedKeys.POOL, SkippedUpdate.NONE),
    WideVariant("alvts-default", SkippedKeys.POOL, default_skipped_update(SkippedKeys.POOL, has_fitted_maps=True)),
)


def runtime_matmul_share(
    policy, variant: WideVariant, rank: int, length: int, text: int, floor_tokens: int, geometry: AttentionGeometry,
    intermediate: int,
) -> float:
    """The matmul FLOPs a routed layer adds to its floor layer's, as a share of them: the selection, and with a
    fitted update the map's down-projection and the batched update (`routing.compensate_skipped`), both over every
    position of the sequence, as the runtime computes them."""
    added = policy.selection_flops(length, text, geometry)
    if variant.skipped_update.fitted:
        added += 2.0 * length * geometry.hidden_size * rank + 2.0 * length * (rank + 1) * geometry.hidden_size
    return added / layer_flops(floor_tokens, geometry, intermediate)


def floor_inputs(decoder: DecoderInputs, visual_kept: int) -> DecoderInputs:
    """The decoder inputs with only the first `visual_kept` visual tokens of each row (every row alike)."""
    visual = decoder.visual
    keep = ~visual | (visual.cumsum(1) <= visual_kept)
    positions = keep[0].nonzero().squeeze(1)
    kwargs: dict[str, Any] = {}
    for name, value in decoder.kwargs.items():
        axis = value.dim() - 1 if name == "position_ids" else 1
        kwargs[name] = value.index_select(axis, positions.to(value.device))
    return DecoderInputs(kwargs, visual.index_select(1, positions))


@dataclass
class Run:
    """One timed configuration: decoder inputs, and the policies to attach (None: the unpatched model)."""

    name: str
    decoder: DecoderInputs
    policies: dict | None = None
    variant: WideVariant | None = None


def interleaved_seconds(model: torch.nn.Module, selector, runs: list[Run], rounds: int) -> dict[str, list[float]]:
    """Thread CPU seconds of each run's prefill over `rounds` rounds, the runs taking turns within a round (after
    one untimed round), so that slow changes in the machine's load reach every run alike."""
    times: dict[str, list[float]] = {run.name: [] for run in runs}
    for round_index in range(rounds + 1):
        for run in runs:
            with attached_run(model, selector, run):
                started = time.thread_time()
                decoder_prefill(model, run.decoder, routed=run.policies is not None)
                elapsed = time.thread_time() - started
            if round_index:
                times[run.name].append(elapsed)
    return times


@contextmanager
def attached_run(model: torch.nn.Module, selector, run: Run) -> Iterator[None]:
    if run.policies is None:
        yield
        return
    variant = run.variant or WideVariant("keep-all", SkippedKeys.DROP, SkippedUpdate.NONE)
    attach_policies(model, run.policies, selector=selector, skipped_keys=variant.skipped_keys,
                    skipped_update=variant.skipped_update)
    try:
        yield
    finally:
        detach(model)


def _ratios(times: dict[str, list[float]], name: str, base: str) -> list[float]:
    """Per round, the run's time over the base run's."""
    return [t / b for t, b in zip(times[name], times[base], strict=True)]


@dataclass
class WideSetup:
    """One wide geometry ready to time: the model, its weight-SVD selector (every layer) and the decoder's inputs."""

    model: torch.nn.Module
    selector: Selector
    geometry: AttentionGeometry
    decoder: DecoderInputs
    visual: torch.Tensor  # (1, L) bool
    num_visual: int

    @classmethod
    def of(cls, spec: ModelSpec) -> WideSetup:
        model = build_model(spec, "sdpa", torch.device("cpu"), torch.float32)
        inputs = build_inputs(spec, model, 1, torch.device("cpu"), torch.float32)
        visual = visual_mask(spec, inputs)
        return cls(model, weight_svd_selector(model, start_layer=0), AttentionGeometry.of(model),
                   capture_decoder_inputs(model, inputs, visual), visual, int(visual[0].sum()))

    def routed_runs(self, compression: float, variants=VARIANTS) -> tuple[int, list[Run]]:
        """The visual tokens per layer at `compression`, and its runs: the floor, then each variant."""
        selector, layers, num_visual = self.selector, self.geometry.num_layers, self.num_visual
        count = alvts_plan(selector, 1.0 - compression, layers, num_visual).planned_tokens[-1]
        runs = [Run("floor", floor_inputs(self.decoder, count))]
        for variant in variants:
            plan = alvts_plan(selector, 1.0 - compression, layers, num_visual, variant.skipped_keys)
            runs.append(Run(variant.method, self.decoder, plan.policies, variant))
        return count, runs


def benchmark_wide(spec: ModelSpec, console: Console | None = None) -> dict[str, Any]:
    """Every variant of one wide geometry: unpatched, keep-all, and per compression its floor and the runtimes."""
    setup = WideSetup.of(spec)
    model, selector, geometry, decoder = setup.model, setup.selector, setup.geometry, setup.decoder
    visual, num_visual = setup.visual, setup.num_visual
    log = console.log if console is not None else (lambda *args: None)
    keep_all = {index: SelectorPolicy(layer, 1.0, selector.importance) for index, layer in selector.layers.items()}
    log(f"{spec.name}: unpatched and keep-all")
    times = interleaved_seconds(model, selector, [Run("unpatched", decoder), Run("alvts-keep-all", decoder, keep_all)],
                                FULL_ROUNDS)
    unpatched = 1e3 * statistics.median(times["unpatched"])
    rows: list[dict[str, Any]] = [
        {"method": "unpatched", "compression": None, "prefill_ms": unpatched},
        {"method": "alvts-keep-all", "compression": 0.0, "prefill_ms": 1e3 * statistics.median(times["alvts-keep-all"]),
         "unpatched_ratio": statistics.median(_ratios(times, "alvts-keep-all", "unpatched"))},
    ]
    for compression in COMPRESSIONS:
        log(f"{spec.name}: {compression:.0%}")
        count, runs = setup.routed_runs(compression)
        times = interleaved_seconds(model, selector, runs, ROUTED_ROUNDS)
        rows.append({"method": "floor", "compression": compression, "visual_per_layer": count,
                     "prefill_ms": 1e3 * statistics.median(times["floor"])})
        for run in runs[1:]:
            ratios = _ratios(times, run.name, "floor")
            with attached_run(model, selector, run):
                ranges, syncs = range_seconds(lambda: decoder_prefill(model, decoder, routed=True), PROFILED_PREFILLS)
            policy = next(p for p in run.policies.values() if not p.keeps_all)
            share = runtime_matmul_share(policy, run.variant, selector.skip_updates[0].down.out_features,
                                         visual.shape[1], visual.shape[1] - num_visual,
                                         visual.shape[1] - num_visual + count, geometry, spec.intermediate)
            rows.append({"method": run.name, "compression": compression, "visual_per_layer": count,
                         "prefill_ms": 1e3 * statistics.median(times[run.name]), "matmul_share": share,
                         "floor_ratio": statistics.median(ratios), "floor_ratio_range": [min(ratios), max(ratios)],
                         "host_syncs": syncs, "ranges_ms": {name: 1e3 * seconds for name, seconds in ranges.items()}})
    for row in rows:
        row["speedup"] = unpatched / row["prefill_ms"]
    return {"model": spec.name, "geometry": {"hidden": spec.hidden, "layers": spec.layers, "heads": spec.heads,
                                             "kv_heads": spec.kv_heads, "intermediate": spec.intermediate},
            "visual_tokens": num_visual, "text_tokens": visual.shape[1] - num_visual,
            "selector_rank": selector.layers[0].q_proj.out_features, "rows": rows}


def print_wide(results: list[dict[str, Any]], console: Console) -> None:
    """One table per geometry: prefill, ratio to the floor, and the profiled ranges of each routed variant."""
    for result in results:
        names = sorted({name for row in result["rows"] for name in row.get("ranges_ms", {})})
        table = Table(title=f"{result['model']}: {result['geometry']['layers']} layers, every one routed "
                            f"({result['visual_tokens']} visual + {result['text_tokens']} text tokens, CPU ms)")
        for column in ("method", "compr.", "visual/layer", "prefill ms", "x unpatched", "x floor", "syncs", *names):
            table.add_column(column, justify="left" if column == "method" else "right")
        for row in result["rows"]:
            compression = row["compression"]
            ranges = row.get("ranges_ms", {})
            table.add_row(
                row["method"], "-" if compression is None else f"{compression:.0%}",
                str(row.get("visual_per_layer", result["visual_tokens"])), f"{row['prefill_ms']:.0f}",
                f"{row['speedup']:.2f}", f"{row['floor_ratio']:.3f}" if "floor_ratio" in row else "-",
                str(row.get("host_syncs", "-")),
                *(f"{ranges[name]:.1f}" if name in ranges else "-" for name in names),
            )
        console.print(table)


def markdown_wide(results: list[dict[str, Any]]) -> str:
    """The `print_wide` tables as markdown, one per geometry (thread CPU ms; steps: medians of profiled prefills)."""
    steps = ("select", "compact", "pool", "mask", "update", "scatter")
    lines = []
    for result in results:
        geometry = result["geometry"]
        floors = {row["compression"]: row["prefill_ms"] for row in result["rows"] if row["method"] == "floor"}
        lines += [f"**{result['model']}**: {geometry['layers']} layers at hidden {geometry['hidden']}, "
                  f"every one routed, {result['visual_tokens']} visual + {result['text_tokens']} text tokens, selector "
                  f"rank {result['selector_rank']}", "",
                  "| method | compr. | visual / layer | prefill ms | x unpatched | x floor (range) | host syncs | "
                  + " | ".join(steps) + " | steps / floor | matmuls / floor |",
                  "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(steps) + 2)]
        for row in result["rows"]:
            compression = "-" if row["compression"] is None else f"{row['compression']:.0%}"
            ratio = "-"
            if "floor_ratio" in row:
                low, high = row["floor_ratio_range"]
                ratio = f"{row['floor_ratio']:.3f} ({low:.3f}-{high:.3f})"
            elif "unpatched_ratio" in row:
                ratio = f"{row['unpatched_ratio']:.3f} of unpatched"
            ranges = row.get("ranges_ms", {})
            shares = ["-", "-"]
            if ranges:
                floor = floors[row["compression"]]
                shares = [f"{100 * sum(ranges.values()) / floor:.1f}%", f"{100 * row['matmul_share']:.1f}%"]
            lines.append(
                f"| {row['method']} | {compression} | {row.get('visual_per_layer', result['visual_tokens'])} | "
                f"{row['prefill_ms']:.0f} | {row['speedup']:.2f} | {ratio} | {row.get('host_syncs', '-')} | "
                + " | ".join(f"{ranges[step]:.1f}" if step in ranges else "-" for step in steps)
                + f" | {' | '.join(shares)} |")
        lines.append("")
    return "\n".join(lines)
