#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) in one call on a CUDA machine without network: < 10 min on one H200.
#
#   bash benchmarks/gpu_check.sh [OUT]                 # default OUT: runs/gpu-check; writes OUT/gpu_check.json
#   bash benchmarks/gpu_check.sh --fetch-wheels DIR    # beforehand, on a machine WITH network: the wheels it lacks
#   bash benchmarks/gpu_check.sh --dry-run             # its logic on the CPU with a tiny model
#
# The GPU machine has torch, transformers, peft and accelerate; the rest (paft's own light dependencies, trl,
# datasets, bitsandbytes) comes as wheels in $PAFT_WHEELS (default: wheels/ beside the checkout), carried
# along at check time and never committed. Installed with --no-index: nothing is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${PAFT_WHEELS:-wheels}
EXTRA=(trl datasets bitsandbytes pydantic typer rich pyyaml safetensors)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  dir=${2:?give the folder for the wheels}
  # the GPU machine's Python and platform, when they differ from this one: PIP_PLATFORM=manylinux2014_x86_64 etc.
  python -m pip download -d "$dir" --only-binary=:all: "${EXTRA[@]}"
  exit 0
fi
if [[ "${1:-}" == "--dry-run" ]]; then
  exec python benchmarks/gpu_check.py --dry-run --out "${2:-runs/gpu-check-dry}"
fi
OUT=${1:-runs/gpu-check}

if [[ -d "$WHEELS" ]]; then
  python -m pip install -q --no-index --find-links "$WHEELS" "${EXTRA[@]}" || echo "some wheels missing in $WHEELS: those sections are skipped"
fi
python -c "import paft" 2>/dev/null || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 570 python benchmarks/gpu_check.py --out "$OUT"
