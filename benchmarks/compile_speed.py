"""Compiled against eager prefill with a selector attached: same logits, and what torch.compile saves on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/compile_speed.py [--layers 4] [--backend inductor]

The `--small` LLaVA-1.5 geometry of `speed.py` (hidden 256) with `--layers` decoder layers, batch 1, every layer
but the first routed at 89% compression, for the unpatched model, the default runtime (pooled stand-in, linear
update) and the paper's (skipped keys dropped, no update). Each row times one full prefill (vision tower, decoder,
last position's logits), median thread CPU time of 5 runs after 2 warmups (the first compiles), eager and with
`torch.compile(model.forward, backend=...)`, and the largest logit difference between the two.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
from speed_measure import Timing, median_seconds
from speed_methods import weight_svd_selector
from speed_models import SMALL, build_inputs, build_model

from alvts_calib import attach, detach

COMPRESSION = 0.89
RUNTIMES = {"unpatched": None, "default": ("pool", "linear"), "paper": ("drop", "none")}
TIMING = Timing(warmup=2, repetitions=5, clock="thread-cpu")


def measure(model: torch.nn.Module, inputs: dict[str, torch.Tensor], backend: str) -> dict[str, float]:
    """Eager and compiled prefill seconds, the first compiled call's wall time, and the largest logit difference."""
    device = inputs["input_ids"].device

    def prefill() -> torch.Tensor:
        return model(**inputs, logits_to_keep=1).logits

    with torch.no_grad():
        eager_logits = prefill()
        eager = median_seconds(prefill, device, TIMING)
        model.forward = torch.compile(model.forward, backend=backend)
        try:
            started = time.perf_counter()
            compiled_logits = prefill()
            first = time.perf_counter() - started
            compiled = median_seconds(prefill, device, TIMING)
        finally:
            del model.forward
            torch._dynamo.reset()
    difference = (compiled_logits - eager_logits).abs().max().item()
    return {"eager_s": eager, "compiled_s": compiled, "first_call_s": first, "max_logit_difference": difference}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args(argv)
    spec = replace(SMALL[0], layers=args.layers)
    device = torch.device("cpu")
    model = build_model(spec, "sdpa", device, torch.float32)
    inputs = build_inputs(spec, model, 1, device, torch.float32)
    selector = weight_svd_selector(model)
    print(f"{spec.name} with {args.layers} layers, backend {args.backend}, {COMPRESSION:.0%} compression")
    print("runtime    eager ms  compiled ms  speedup  first call s  max |logit diff|")
    for name, runtime in RUNTIMES.items():
        if runtime is not None:
            keys, update = runtime
            attach(model, selector, keep_ratio=1.0 - COMPRESSION, skipped_keys=keys, skipped_update=update)
        try:
            row = measure(model, inputs, args.backend)
        finally:
            if runtime is not None:
                detach(model)
        speedup = row["eager_s"] / row["compiled_s"]
        print(f"{name:9s} {1e3 * row['eager_s']:9.1f} {1e3 * row['compiled_s']:12.1f} {speedup:7.2f}x "
              f"{row['first_call_s']:12.1f} {row['max_logit_difference']:17.2e}")


if __name__ == "__main__":
    main()
