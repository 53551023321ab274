#!/usr/bin/env bash
# Every GPU measurement of docs/BENCHMARKS.md in one call, aimed at under 8 minutes on one H200 (not yet run on
# one: no GPU was lent so far). Writes JSON under $OUT (default docs/results):
#   - full-size speed (`benchmarks/speed.py --quick`): LLaVA-1.5-7B at batch 1 and 8, LLaVA-NeXT-7B and
#     Qwen2.5-VL-7B at batch 1; SDPA, and FlashAttention-2 where `flash_attn` imports;
#   - compiled against eager prefill (`benchmarks/compile_speed.py`);
#   - the calibration benchmark at LLaVA-1.5-7B width (`benchmarks/calibration_speed.py`).
# Each step has its own time limit, so one slow step cannot eat the others' time.
#
#   bash scripts/gpu_check.sh          # on the GPU machine
#   bash scripts/gpu_check.sh --cpu    # the same steps at toy size on the CPU: checks the script, not speed
#                                      # (3 minutes on the 2-core CPU, 2026-11-29)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/results}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1  # the tables of steps that print rather than write JSON, kept
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - > "$OUT/gpu-check-environment.json" <<'PY'
import importlib.util, json, platform
import torch, transformers
cuda = torch.cuda.is_available()
print(json.dumps({
    "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
    "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    "flash_attn": importlib.util.find_spec("flash_attn") is not None,
}, indent=1))
PY
cat "$OUT/gpu-check-environment.json"

step() {  # step SECONDS NAME COMMAND...: run one step under its limit, keep going if it fails
    local limit=$1 name=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" || echo "!! $name failed or ran out of time (exit $?)"
}

if [[ "${1:-}" == "--cpu" ]]; then
    step 300 speed "$PYTHON" benchmarks/speed.py --small --models llava-1.5-small --batches 1 --new-tokens 2 \
        --calibration-samples 0 --quick --out "$OUT/gpu-check-speed-cpu.json"
    step 300 compile "$PYTHON" benchmarks/compile_speed.py --layers 2 --backend aot_eager
    step 300 calibration "$PYTHON" benchmarks/calibration_speed.py --layers 1 --samples 2 --sensitivity-samples 1 \
        --out "$OUT/gpu-check-calibration-cpu.json"
    exit 0
fi

step 180 speed-llava15 "$PYTHON" benchmarks/speed.py --models llava-1.5-7b --batches 1 8 --new-tokens 32 \
    --calibration-samples 0 --quick --out "$OUT/speed-h200-llava15.json"
step 120 speed-next-qwen "$PYTHON" benchmarks/speed.py --models llava-next-7b qwen2.5-vl-7b --batches 1 \
    --new-tokens 16 --calibration-samples 0 --quick --out "$OUT/speed-h200-next-qwen.json"
step 60 compile "$PYTHON" benchmarks/compile_speed.py --layers 4 --backend inductor
step 120 calibration "$PYTHON" benchmarks/calibration_speed.py --layers 4 --samples 16 --sensitivity-samples 4 \
    --out "$OUT/calibration-speed-h200.json"
