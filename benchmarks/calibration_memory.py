"""Peak memory of `alvts_calib.calibrate` against the number of calibration samples, on a scaled-down model.

Each sample count runs in a fresh subprocess (peak RSS is per process), with glibc's mmap threshold fixed at
64 KiB so that freed activations go back to the OS: with the default dynamic threshold, heap fragmentation
made the peak RSS about 3x the live tensors on this machine. The table compares the measured growth
over the 1-sample run with the formula of README "Calibration memory":
    stored = N * L * (D * b + 2 * hd * b)        layer inputs kept on `storage` (CPU), model dtype b bytes
    layer  = N * L * (4 * D + 8 * hd)            one layer's float32 normed inputs and cos/sin, on the layer's device
Usage: python benchmarks/calibration_memory.py [--samples 8 32 64] [--out docs/results/calibration-memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

import torch

HIDDEN, LAYERS, HEADS, LENGTH, VISUAL = 512, 4, 8, 512, 384


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=2 * LENGTH)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def _samples(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    visual = torch.zeros(1, LENGTH, dtype=torch.bool)
    visual[:, 8 : 8 + VISUAL] = True
    return [{"input_ids": torch.randint(3, 256, (1, LENGTH), generator=generator), "visual_mask": visual}
            for _ in range(count)]


def measure(count: int) -> dict:
    """Run one calibration with `count` samples in this process; peak RSS (and CUDA) in MiB."""
    from alvts_calib import calibrate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, samples = _model().to(device), _samples(count)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    calibrate(model, samples, refine_steps=5, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return {"samples": count, "rss_before_mib": before, "rss_peak_mib": peak, "cuda_peak_mib": gpu}


def formula_mib(count: int, dtype_bytes: int = 4) -> float:
    head_dim = HIDDEN // HEADS
    stored = count * LENGTH * (HIDDEN * dtype_bytes + 2 * head_dim * dtype_bytes)
    layer = count * LENGTH * (4 * HIDDEN + 8 * head_dim)
    return (stored + layer) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--out", default="docs/results/calibration-memory.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child)))
        return
    runs = []
    for count in [1, *args.samples]:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
        done = subprocess.run([sys.executable, __file__, "--child", str(count)], capture_output=True, text=True,
                              check=True, env=env)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = runs[0]["rss_peak_mib"]
    print(f"model: Llama hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, float32; {LENGTH} tokens per sample")
    print(f"{'samples':>8} {'peak RSS MiB':>13} {'growth MiB':>11} {'formula MiB':>12} {'CUDA peak MiB':>14}")
    for run in runs:
        run["growth_mib"] = run["rss_peak_mib"] - base
        run["formula_mib"] = formula_mib(run["samples"]) - formula_mib(1)
        cuda = "-" if run["cuda_peak_mib"] is None else f"{run['cuda_peak_mib']:.0f}"
        print(f"{run['samples']:>8} {run['rss_peak_mib']:>13.0f} {run['growth_mib']:>11.0f} "
              f"{run['formula_mib']:>12.0f} {cuda:>14}")
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
               "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with open(args.out, "w") as file:
        json.dump({"machine": machine, "runs": runs}, file, indent=2)


if __name__ == "__main__":
    main()
