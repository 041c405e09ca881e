#!/usr/bin/env bash
# The main job from a fresh clone: install what is missing (scripts/setup.sh), then `paft run` with these
# arguments (none: the embedded default), from the current folder.
set -euo pipefail
bash "$(dirname "$0")/setup.sh"
if command -v paft >/dev/null; then exec paft run "$@"; fi
exec python -m paft.cli run "$@"  # pip's script folder is not on PATH
