#!/usr/bin/env bash
# Create .venv (if missing) with the CPU build of torch and this package installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: this machine carries the CPU wheel; a bare `torch` requirement could pull a CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-warn-conflicts -e ".[test,accelerate]"
# The lmms-eval plugin and its tests need the lmms-eval extra. lmms-eval's own requirements include torchvision, whose
# newest release needs a newer torch than the one above (pip would replace it with a CUDA build), and dozens of
# packages that only its other models and tasks import. So the extra goes in without dependencies, followed by what
# lmms-eval's evaluator imports.
python -m pip install -q --no-deps "lmms-eval>=0.7.3,<0.8" "decord>=0.6" "filelock<4"
python -m pip install -q --no-warn-conflicts loguru evaluate sacrebleu tenacity aiohttp pytablewriter
