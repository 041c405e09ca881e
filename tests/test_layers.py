"""The import contract (pyproject's [tool.importlinter]): layers only import downward, siblings form no cycle."""

import shutil
import subprocess
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports not found: install the test extras (bash scripts/test.sh does)")
    res = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "2 kept, 0 broken" in res.stdout


def test_the_contract_catches_an_upward_import():
    """The same layers, checked on paft's graph plus one import that goes up: the check must report it."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pip's copy
        from pip._vendor import tomli as tomllib
    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    graph = grimp.build_graph("paft")
    graph.add_import(importer="paft.data.formats", imported="paft.train.trainer")
    levels = [grimp.Layer(*(m.strip() for m in layer.split("|")), independent=True) for layer in layers]
    illegal = graph.find_illegal_dependencies_for_layers(layers=levels)
    assert any(d.importer == "paft.data" and d.imported == "paft.train" for d in illegal), illegal


def test_paft_modules_import_paft_at_module_top():
    """paft-internal imports sit at module top, so the arrows above are visible. The one exception is the CLI,
    whose commands import their work lazily: it pulls torch and transformers (seconds) that `paft --help`,
    `paft config` and `paft methods` do not need."""
    lazy = []
    for path in sorted((ROOT / "src" / "paft").rglob("*.py")):
        if path.name == "cli.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.lstrip()
            if line != stripped and stripped.startswith(("from paft", "import paft")) and "# lazy:" not in line:
                lazy.append(f"{path.relative_to(ROOT / 'src')}:{i}: {stripped}")
    assert not lazy, "\n".join(lazy)
