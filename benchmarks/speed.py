"""Routed-inference speed at real scale: unpatched vs ALVTS vs FastV / PyramidDrop at matched budgets.

Full-size architectures with random weights (LLaVA-1.5-7B, LLaVA-NeXT-7B, Qwen2.5-VL-7B geometries) in bf16 on a
GPU; `--small` runs scaled-down geometries in float32 on the CPU through the same code paths. Prints a table and
writes JSON.

Usage:
    python benchmarks/speed.py --out docs/results/speed-h100.json            # GPU, full size
    python benchmarks/speed.py --small --out docs/results/speed-small-cpu.json
    python benchmarks/speed.py --wide --out docs/results/speed-wide-cpu.json       # CPU, real layer width
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
from speed_measure import (
    Timing,
    capture_decoder_inputs,
    decode_tokens_per_second,
    decoder_prefill,
    first_token,
    kv_bytes,
    median_seconds,
    peak_memory,
    routed_shares,
)
from speed_methods import Variant, ideal_speedup, selection_flops, variants, weight_svd_selector
from speed_models import FULL, SMALL, ModelSpec, build_inputs, build_model, visual_mask
from speed_wide import FULL_ROUNDS, ROUTED_ROUNDS, WIDE, benchmark_wide, markdown_wide, print_wide

import alvts_calib
from alvts_calib.artifact import Selector
from alvts_calib.model import AttentionGeometry
from alvts_calib.runtime import attach_policies, detach


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures and how often."""

    specs: tuple[ModelSpec, ...]
    backends: tuple[str, ...]
    batches: tuple[int, ...]
    new_tokens: int
    timing: Timing  # prefill and time to first token
    decode_timing: Timing
    calibration_samples: int
    device: torch.device
    dtype: torch.dtype


def settings_for(small: bool, device: torch.device, models: Sequence[str] | None = None) -> Settings:
    """Full-size (GPU, bf16) or `--small` (scaled down, float32 on CPU) settings."""
    specs = SMALL if small else FULL
    if models:
        specs = tuple(spec for spec in specs if spec.name in models)
    backends = ("sdpa",) + (("flash_attention_2",) if _flash_available(device) else ())
    if small:
        return Settings(specs, backends, (1, 8), 8, Timing(1, 3, "thread-cpu"), Timing(0, 1, "thread-cpu"), 16,
                        device, torch.float32)
    return Settings(specs, backends, (1, 8), 256, Timing(3, 10), Timing(1, 3), 256, device, torch.bfloat16)


def _flash_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def measure_variant(model: torch.nn.Module, inputs: dict[str, torch.Tensor], decoder, variant: Variant,
                    settings: Settings, selector: Selector) -> dict[str, Any]:
    """Every measure of one variant; the model is patched for the duration and restored after (`selector`
    supplies the skip-update maps)."""
    routed = variant.policies is not None
    if routed:
        attach_policies(model, variant.policies, selector=selector, skipped_keys=variant.skipped_keys,
                        skipped_update=variant.skipped_update)
    try:
        device = settings.device
        row: dict[str, Any] = {
            "prefill_ms": 1e3 * median_seconds(lambda: decoder_prefill(model, decoder, routed), device,
                                               settings.timing),
            "ttft_ms": 1e3 * median_seconds(lambda: first_token(model, inputs), device, settings.timing),
            "decode_tokens_per_s": decode_tokens_per_second(model, inputs, settings.new_tokens, device,
                                                            settings.decode_timing),
            "peak_memory_bytes": peak_memory(model, inputs, settings.new_tokens, device),
            "kv_bytes_per_layer": kv_bytes(decoder_prefill(model, decoder, routed)),
        }
        if routed and variant.compression:
            row.update(routed_shares(model, decoder, device))
        return row
    finally:
        if routed:
            detach(model)


def _compare(rows: list[dict[str, Any]], geometry: AttentionGeometry, intermediate: int, num_visual: int,
             num_text: int) -> None:
    """Add speedups and KV reductions against the unpatched row of the same backend and batch."""
    base = rows[0]
    for row in rows:
        routed = row.pop("routed_layers")
        row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
        row["ttft_speedup"] = base["ttft_ms"] / row["ttft_ms"]
        row["decode_speedup"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        planned = row.pop("planned_tokens")
        row["ideal_prefill_speedup"] = ideal_speedup(planned, num_visual, num_text, geometry, intermediate)
        row["ideal_prefill_speedup_with_selection"] = ideal_speedup(
            planned, num_visual, num_text, geometry, intermediate, row.pop("selection_flops")
        )
        row["kv_bytes"] = sum(row["kv_bytes_per_layer"])
        routed_base = sum(base["kv_bytes_per_layer"][i] for i in routed)
        routed_now = sum(row["kv_bytes_per_layer"][i] for i in routed)
        row["kv_routed_layers_reduction"] = 1.0 - routed_now / routed_base if routed_base else 0.0


def benchmark_model(spec: ModelSpec, settings: Settings, console: Console | None = None) -> dict[str, Any]:
    """All variants of one geometry, for every backend and batch size."""
    results: dict[str, Any] = {"model": spec.name, "geometry": asdict(spec), "runs": []}
    for backend in settings.backends:
        model = build_model(spec, backend, settings.device, settings.dtype)
        selector = weight_svd_selector(model)
        geometry = AttentionGeometry.of(model)
        for batch in settings.batches:
            inputs = build_inputs(spec, model, batch, settings.device, settings.dtype)
            visual = visual_mask(spec, inputs)
            num_visual, length = int(visual[0].sum()), visual.shape[1]
            decoder = capture_decoder_inputs(model, inputs, visual)
            rows = []
            for variant in variants(selector, geometry.num_layers, num_visual):
                if console is not None:
                    console.log(f"{spec.name} {backend} batch {batch}: {variant.method} {variant.compression}")
                row = {"method": variant.method, "compression": variant.compression,
                       "planned_tokens": variant.planned_tokens, "routed_layers": sorted(variant.policies or ()),
                       "selection_flops": selection_flops(variant.policies, length, length - num_visual, geometry)}
                row.update(measure_variant(model, inputs, decoder, variant, settings, selector))
                rows.append(row)
            _compare(rows, geometry, spec.intermediate, num_visual, length - num_visual)
            results["runs"].append({"backend": backend, "batch": batch, "visual_tokens": num_visual,
                                    "text_tokens": length - num_visual, "rows": rows})
        results["selector_rank"] = selector.layers[selector.start_layer].q_proj.out_features
        del model, selector
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def calibration_seconds(spec: ModelSpec, samples: int, settings: Settings) -> dict[str, Any]:
    """Wall time of `alvts_calib.calibrate` (default options) on `samples` synthetic single-image prompts."""
    model = build_model(spec, "sdpa", settings.device, settings.dtype)
    data = [build_inputs(spec, model, 1, settings.device, settings.dtype, seed=seed) for seed in range(samples)]
    if settings.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(settings.device)
    started = time.perf_counter()
    calibration = alvts_calib.calibrate(model, data, progress=False)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(settings.device) if settings.device.type == "cuda" else None
    return {"model": spec.name, "samples": samples, "rank": calibration.rank, "seconds": seconds,
            "peak_memory_bytes": peak}


def _metadata(settings: Settings, small: bool) -> dict[str, Any]:
    device = settings.device
    return {
        "date": datetime.date.today().isoformat(),
        "mode": "small" if small else "full",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(settings.dtype).removeprefix("torch."),
        "backends": list(settings.backends),
        "batches": list(settings.batches),
        "new_tokens": settings.new_tokens,
        "timing": {"prefill_and_ttft": asdict(settings.timing), "decode": asdict(settings.decode_timing)},
        "notes": [
            "random weights from configs; selectors from the RoPE-aware weight SVD at rank 2 x head_dim",
            "alvts-adaptive* is a synthetic allocation: alternating 1.5x / 0.5x the uniform per-layer count",
            "prefill: decoder stack only (inputs_embeds replayed); ttft: vision tower + projector + prefill + "
            "last-position logits; decode: (N - 1) / (t(N tokens) - t(1 token)) per row",
            "ideal_prefill_speedup: decoder layer matmul FLOPs, unpatched over planned token counts; "
            "_with_selection adds the policies' own selection FLOPs",
            "selector/gather_scatter shares: profiler ranges in one routed prefill (inflated by profiling)",
        ],
    }


def _format(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def print_tables(report: dict[str, Any], console: Console) -> None:
    """One table per model, backend and batch size."""
    for model in report["models"]:
        for run in model["runs"]:
            table = Table(title=f"{model['model']} {run['backend']} batch {run['batch']} "
                                f"({run['visual_tokens']} visual + {run['text_tokens']} text tokens)")
            for column in ("method", "compr.", "prefill ms", "x", "ideal x", "TTFT ms", "x", "decode tok/s",
                           "KV MiB", "routed KV -%", "select %", "gather %", "syncs"):
                table.add_column(column, justify="left" if column == "method" else "right")
            for row in run["rows"]:
                table.add_row(
                    row["method"], _format(row["compression"], "{:.0%}"), f"{row['prefill_ms']:.1f}",
                    f"{row['prefill_speedup']:.2f}", f"{row['ideal_prefill_speedup']:.2f}", f"{row['ttft_ms']:.1f}",
                    f"{row['ttft_speedup']:.2f}", f"{row['decode_tokens_per_s']:.1f}",
                    f"{row['kv_bytes'] / 2**20:.1f}", _format(100 * row["kv_routed_layers_reduction"], "{:.0f}"),
                    _format(_percent(row.get("selector_share")), "{:.1f}"),
                    _format(_percent(row.get("gather_scatter_share")), "{:.1f}"),
                    _format(row.get("host_syncs"), "{}"),
                )
            console.print(table)
    calibration = report.get("calibration")
    if calibration:
        console.print(f"calibration of {calibration['samples']} samples on {calibration['model']} geometry "
                      f"(rank {calibration['rank']}): {calibration['seconds']:.1f} s")


def _percent(share: float | None) -> float | None:
    return None if share is None else 100 * share


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="scaled-down geometries on the CPU (development)")
    parser.add_argument("--wide", action="store_true",
                        help="real layer widths, few layers, every layer routed, against the floor (CPU)")
    parser.add_argument("--markdown", type=Path, help="with --wide: also write the tables as markdown here")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--models", nargs="*", help="only these geometries (names as in the table)")
    parser.add_argument("--batches", type=int, nargs="*", help="override the batch sizes (default 1 8)")
    parser.add_argument("--new-tokens", type=int, help="override the decoded tokens (default 256, small 8)")
    parser.add_argument("--calibration-samples", type=int, help="override the calibration sample count (0: skip)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions (prefill and TTFT: 5 after 2 warmups; decode: one run), for a GPU "
                             "session with little time")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.wide else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # all compute on the timed thread: the thread-cpu clock then counts all of it
    settings = settings_for(args.small, device, args.models)
    if args.batches:
        settings = replace(settings, batches=tuple(args.batches))
    if args.new_tokens:
        settings = replace(settings, new_tokens=args.new_tokens)
    if args.quick:
        clock = settings.timing.clock
        settings = replace(settings, timing=Timing(2, 5, clock), decode_timing=Timing(0, 1, clock))
    console = Console(width=200) if args.wide else Console()
    if args.wide:
        report = _wide_report(settings, args.models, console)
        if args.markdown is not None:
            args.markdown.write_text(markdown_wide(report["models"]))
        return _write(report, args.out)
    report: dict[str, Any] = {"metadata": _metadata(settings, args.small), "models": []}
    for spec in settings.specs:
        report["models"].append(benchmark_model(spec, settings, console))
    samples = settings.calibration_samples if args.calibration_samples is None else args.calibration_samples
    if samples > 0:
        report["calibration"] = calibration_seconds(settings.specs[0], samples, settings)
    print_tables(report, console)
    return _write(report, args.out)


def _wide_report(settings: Settings, models: Sequence[str] | None, console: Console) -> dict[str, Any]:
    """`--wide`: the WIDE geometries (all, or those named) on the CPU; see `speed_wide`."""
    metadata = {key: value for key, value in _metadata(settings, small=False).items()
                if key in ("date", "device", "cpu_threads", "torch", "transformers")}
    metadata.update(mode="wide", dtype="float32", backend="sdpa", batch=1,
                    timing={"clock": "thread-cpu", "warmup_rounds": 1, "unpatched_rounds": FULL_ROUNDS,
                            "routed_rounds": ROUTED_ROUNDS})
    results = [benchmark_wide(spec, console) for spec in WIDE if not models or spec.name in models]
    print_wide(results, console)
    return {"metadata": metadata, "models": results}


def _write(report: dict[str, Any], out: Path | None) -> dict[str, Any]:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
