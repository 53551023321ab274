"""Measurements of one model under one routing variant: prefill, time to first token, decoding, memory, KV cache.

Times are medians over repetitions after warmup, with torch.cuda.synchronize around each run on a GPU
(wall-clock on CPU).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from transformers.cache_utils import DynamicCache

from alvts_calib.model import get_adapter, visual_positions
from alvts_calib.runtime import ROUTED_RANGES

PREFILL_RANGE = "bench.prefill"
HOST_SYNC_OPS = ("aten::_local_scalar_dense",)  # every .item()/bool()/int() of a tensor ends here


@dataclass(frozen=True)
class Timing:
    """Untimed warmup runs, timed repetitions, and the clock: "wall", or "thread-cpu" (the calling thread's CPU
    time; with one intra-op thread it is all the compute, and it ignores time lost to other processes)."""

    warmup: int
    repetitions: int
    clock: str = "wall"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run: Callable[[], Any], device: torch.device, timing: Timing) -> float:
    """Median wall time of `run` over `timing.repetitions` runs after `timing.warmup` untimed ones."""
    for _ in range(timing.warmup):
        run()
    clock = time.thread_time if timing.clock == "thread-cpu" else time.perf_counter
    times = []
    for _ in range(timing.repetitions):
        _sync(device)
        started = clock()
        run()
        _sync(device)
        times.append(clock() - started)
    return statistics.median(times)


@dataclass
class DecoderInputs:
    """What the text model received in a full forward: replaying it times the decoder alone."""

    kwargs: dict[str, Any]
    visual: torch.Tensor  # (B, L) bool


def capture_decoder_inputs(model: nn.Module, inputs: dict[str, torch.Tensor], visual: torch.Tensor) -> DecoderInputs:
    """Run the (unpatched) model once and keep the text model's inputs_embeds, mask and position ids."""
    text_model = get_adapter(model).text_model(model)
    seen: dict[str, Any] = {}

    def grab(module, args, kwargs):
        seen.update({name: kwargs.get(name) for name in ("inputs_embeds", "attention_mask", "position_ids")})

    handle = text_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return DecoderInputs({name: value for name, value in seen.items() if value is not None}, visual)


def _routing(model: nn.Module, routed: bool, visual: torch.Tensor) -> contextlib.AbstractContextManager:
    return visual_positions(model, visual) if routed else contextlib.nullcontext()


def decoder_prefill(model: nn.Module, decoder: DecoderInputs, routed: bool) -> DynamicCache:
    """One decoder-only prefill with a fresh cache (the visual positions given explicitly when routed)."""
    text_model = get_adapter(model).text_model(model)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    with torch.no_grad(), _routing(model, routed, decoder.visual):
        text_model(**decoder.kwargs, cache=cache, use_cache=True)
    return cache


def first_token(model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    """Vision tower, projector, decoder prefill and the last position's logits."""
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)


def generate(model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int) -> None:
    """Greedy generation of exactly `new_tokens` tokens."""
    with torch.no_grad():
        model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       pad_token_id=0)


def kv_bytes(cache: DynamicCache) -> list[int]:
    """Bytes of cached keys and values per decoder layer."""
    sizes = []
    for layer in cache.layers:
        tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
        sizes.append(sum(t.numel() * t.element_size() for t in tensors))
    return sizes


def decode_tokens_per_second(model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int,
                             device: torch.device, timing: Timing) -> float:
    """Per-row decoding rate: (new_tokens - 1) / (time for new_tokens - time for 1 token)."""
    longer = median_seconds(lambda: generate(model, inputs, new_tokens), device, timing)
    one = median_seconds(lambda: generate(model, inputs, 1), device, timing)
    return (new_tokens - 1) / max(longer - one, 1e-9)


def peak_memory(model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int,
                device: torch.device) -> int | None:
    """Peak GPU bytes allocated over one generation (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    generate(model, inputs, new_tokens)
    return torch.cuda.max_memory_allocated(device)


def routed_shares(model: nn.Module, decoder: DecoderInputs, device: torch.device) -> dict[str, float]:
    """Share of one routed decoder prefill spent selecting and compacting/scattering, plus host syncs and ops.

    Read from profiler ranges (GPU time on CUDA, CPU time otherwise); profiling inflates small ops, so shares
    are upper estimates.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    decoder_prefill(model, decoder, routed=True)
    with profile(activities=activities) as profiler:
        with record_function(PREFILL_RANGE):
            decoder_prefill(model, decoder, routed=True)
        _sync(device)
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    ops = 0
    for event in profiler.events():
        if event.device_type != DeviceType.CPU:  # GPU-side copies of the ranges; CPU events carry device time
            continue
        elapsed = event.device_time_total if device.type == "cuda" else event.cpu_time_total
        totals[event.name] = totals.get(event.name, 0.0) + elapsed
        counts[event.name] = counts.get(event.name, 0) + 1
        ops += event.name.startswith("aten::") and event.cpu_parent is not None and \
            not event.cpu_parent.name.startswith("aten::")
    total = totals.get(PREFILL_RANGE, 0.0) or 1.0
    return {
        "selector_share": totals.get(ROUTED_RANGES["select"], 0.0) / total,
        "gather_scatter_share": _share(totals, ("compact", "mask", "scatter"), total),
        "stand_in_update_share": _share(totals, ("pool", "update"), total),
        "host_syncs": sum(counts.get(name, 0) for name in HOST_SYNC_OPS),
        "top_level_ops": ops,
    }


def _share(totals: dict[str, float], steps: tuple[str, ...], total: float) -> float:
    return sum(totals.get(ROUTED_RANGES[step], 0.0) for step in steps) / total


def range_seconds(run: Callable[[], Any], repetitions: int = 1) -> tuple[dict[str, float], int]:
    """CPU seconds inside each of the runtime's profiler ranges (`ROUTED_RANGES`, by step) in one call of `run` (the
    median of each step over `repetitions` profiled calls), and the host syncs one call made."""
    names = {name: step for step, name in ROUTED_RANGES.items()}
    samples: dict[str, list[float]] = {step: [] for step in ROUTED_RANGES}
    syncs = 0
    for _ in range(repetitions):
        totals = dict.fromkeys(ROUTED_RANGES, 0.0)
        syncs = 0
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            run()
        for event in profiler.events():
            if event.name in names:
                totals[names[event.name]] += event.cpu_time_total / 1e6
            syncs += event.name in HOST_SYNC_OPS
        for step, seconds in totals.items():
            samples[step].append(seconds)
    return {step: statistics.median(values) for step, values in samples.items()}, syncs
