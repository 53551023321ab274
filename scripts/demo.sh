#!/usr/bin/env bash
# Set up, then run the main job on the built-in demo: calibrate -> export -> inspect -> generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mkdir -p runs
alvts calibrate --out runs/demo-calibration.safetensors
alvts export runs/demo-calibration.safetensors --keep-ratio 0.25 --out runs/demo-selector.safetensors
alvts inspect runs/demo-selector.safetensors
alvts generate --selector runs/demo-selector.safetensors --max-new-tokens 8
