#!/usr/bin/env bash
# The tests from a fresh clone: install what is missing (scripts/setup.sh), then pytest with these arguments
# (none: the default suite; `-m slow` adds the real-model runs), from the repository root.
set -euo pipefail
bash "$(dirname "$0")/setup.sh"
cd "$(dirname "$0")/.."
exec python -m pytest -q "$@"
