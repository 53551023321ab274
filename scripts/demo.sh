#!/usr/bin/env bash
# Set up, then run the main job on the built-in demo model and data:
# calibrate -> export -> inspect -> eval (retention of ALVTS and its peers at 67/78/89% compression).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mkdir -p runs
alvts calibrate --out runs/demo-calibration.safetensors
alvts export runs/demo-calibration.safetensors --keep-ratio 0.11 --out runs/demo-selector.safetensors
alvts inspect runs/demo-selector.safetensors
alvts eval runs/demo-calibration.safetensors --methods alvts-uniform,alvts,oracle,fastv,pyramiddrop,dart,random \
    --out runs/demo-eval.json --markdown runs/demo-eval.md
