"""`paft merge` against mergekit on the same YAML: linear, task_arithmetic, ties, dare_ties (slow).

mergekit runs from its own virtual environment (``PAFT_MERGEKIT_VENV``, default
``~/.cache/paft/mergekit-venv``; ``python benchmarks/merge_bench.py`` creates it); without it the
tests are skipped. Inputs are a small random llama (base, a dense-delta and a sparse-delta variant)
built by the benchmark's builder, in float32 so both tools compute the same arithmetic and compare to
float32 tolerance; one bf16 test shows the rounding difference (mergekit subtracts in bf16, paft in fp32).

DARE's masks come from different RNGs (mergekit: torch's global generator seeded by --random-seed;
paft: one generator per tensor name), so dare_ties is compared by definition: at density 1 it equals
(paft and mergekit) TIES without trimming; at density < 1 both keep the same share of entries, and the
survivors are scaled by 1/density in paft and by ||d||_1 / ||m d||_1 (the L1 norm of the delta restored)
in mergekit 0.1.5, which agree to a fraction of a percent on large tensors.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paft.merge.deltas import open_state
from paft.merge.mergekit_config import load_mergekit_yaml
from paft.merge.methods import merge_deltas
from paft.merge.standalone import run_merge

VENV = Path(os.environ.get("PAFT_MERGEKIT_VENV", "~/.cache/paft/mergekit-venv")).expanduser()
MERGEKIT = VENV / "bin" / "mergekit-yaml"
needs_mergekit = pytest.mark.skipif(not MERGEKIT.is_file(), reason=f"no mergekit venv at {VENV} (python "
                                    "benchmarks/merge_bench.py creates it; or set PAFT_MERGEKIT_VENV)")


def _bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_bench.py"
    spec = importlib.util.spec_from_file_location("paft_merge_bench", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def models32(bench, tmp_path_factory):
    # ~3M parameters: 4 layers, hidden 256, vocab 512, float32 (exact arithmetic parity)
    return bench.build_models(tmp_path_factory.mktemp("mk32"), 3e6, dtype=torch.float32, vocab=512, quiet=True)


@pytest.fixture(scope="module")
def models16(bench, tmp_path_factory):
    return bench.build_models(tmp_path_factory.mktemp("mk16"), 3e6, dtype=torch.bfloat16, vocab=512, quiet=True)


def _merge_both(bench, tmp: Path, name: str, method: str, base, models, *, dtype="float32", params=None,
                seed=0):
    """Write one YAML, merge it with paft (in process) and mergekit (its CLI); the two output folders."""
    cfg = bench.write_config(tmp / f"{name}.yaml", method, base, models, dtype=dtype, params=params)
    out_p, out_m = tmp / f"paft-{name}", tmp / f"mergekit-{name}"
    run_merge(load_mergekit_yaml(cfg), out_p, force=True, workers=1)
    cmd = bench.mergekit_cmd(VENV, cfg, out_m, threads=1, seed=seed)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return open_state(out_p), open_state(out_m)


def _assert_same(a, b, atol: float) -> None:
    assert sorted(a.keys()) == sorted(b.keys())
    worst = max((float((a.get(n).float() - b.get(n).float()).abs().max()), n) for n in a.keys())
    assert worst[0] <= atol, f"max |paft - mergekit| = {worst[0]:.3g} at {worst[1]}"


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.slow
@needs_mergekit
def test_linear_parity(bench, models32, tmp_path, with_base):
    m = models32
    models = [(m["dense"], {"weight": 0.3}), (m["sparse"], {"weight": 0.5})]
    if with_base:  # base listed among the models, as mergekit users do for a soup with the base
        models = [(m["base"], {"weight": 0.2})] + models
    a, b = _merge_both(bench, tmp_path, "linear", "linear", None, models)
    _assert_same(a, b, 1e-6)


@pytest.mark.parametrize("params", [None, {"normalize": True}, {"lambda": 0.6}])
@pytest.mark.slow
@needs_mergekit
def test_task_arithmetic_parity(bench, models32, tmp_path, params):
    m = models32
    models = [(m["dense"], {"weight": 0.7}), (m["sparse"], {"weight": 0.5})]
    a, b = _merge_both(bench, tmp_path, "ta", "task_arithmetic", m["base"], models, params=params)
    _assert_same(a, b, 1e-6)


@pytest.mark.parametrize("params", [None, {"normalize": False}, {"lambda": 0.8}])
@pytest.mark.slow
@needs_mergekit
def test_ties_parity(bench, models32, tmp_path, params):
    m = models32
    models = [(m["dense"], {"weight": 0.6, "density": 0.5}), (m["sparse"], {"weight": 0.4, "density": 0.3})]
    a, b = _merge_both(bench, tmp_path, "ties", "ties", m["base"], models, params=params)
    _assert_same(a, b, 1e-6)


@pytest.mark.slow
@needs_mergekit
def test_ties_parity_bf16(bench, models16, tmp_path):
    """bf16 in and out: mergekit forms the deltas in bf16, paft in fp32, so results differ by bf16 rounding
    (and the magnitude trim can pick another entry among equal bf16 magnitudes)."""
    m = models16
    models = [(m["dense"], {"weight": 0.5, "density": 0.5}), (m["sparse"], {"weight": 0.5, "density": 0.5})]
    a, b = _merge_both(bench, tmp_path, "ties16", "ties", m["base"], models, dtype="bfloat16")
    equal = total = 0
    for n in a.keys():
        x, y = a.get(n).float(), b.get(n).float()
        # at most a few bf16 ulps of the weight (a trimmed-vs-kept entry differs by one delta, ~1e-3 here)
        assert float((x - y).abs().max()) <= 4 * 2.0 ** -8 * max(1.0, float(x.abs().max())), n
        equal += int((x == y).sum())
        total += x.numel()
    assert equal / total > 0.95


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.slow
@needs_mergekit
def test_dare_ties_density_one_is_ties_without_trim(bench, models32, tmp_path, normalize):
    m = models32
    models = [(m["dense"], {"weight": 0.6, "density": 1.0}), (m["sparse"], {"weight": 0.4, "density": 1.0})]
    a, b = _merge_both(bench, tmp_path, "dare1", "dare_ties", m["base"], models, params={"normalize": normalize})
    _assert_same(a, b, 1e-6)
    # and both equal TIES at density 1 with the same normalisation
    ties_models = [(p, {"weight": q["weight"], "density": 1.0}) for p, q in models]
    c, d = _merge_both(bench, tmp_path, "ties1", "ties", m["base"], ties_models, params={"normalize": normalize})
    _assert_same(a, c, 0.0)
    _assert_same(b, d, 0.0)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.slow
@needs_mergekit
def test_dare_ties_statistics(bench, models32, tmp_path, rescale):
    """One model, weight 1, density 0.3: the output delta is ``scale * m * d`` in both tools."""
    m, density = models32, 0.3
    a, b = _merge_both(bench, tmp_path, "dare", "dare_ties", m["base"], [(m["dense"], {"weight": 1.0,
                                                                                      "density": density})],
                       params={"rescale": rescale})
    base, ft = open_state(m["base"]), open_state(m["dense"])
    checked = 0
    for n in base.keys():
        w = base.get(n)
        d = ft.get(n) - w
        if d.numel() < 20000:
            continue
        scales = {}
        for tool, out in (("paft", a), ("mergekit", b)):
            got = out.get(n) - w
            kept = got != 0
            share = float(kept.float().mean())
            sigma = (density * (1 - density) / d.numel()) ** 0.5
            assert abs(share - density) < 6 * sigma, (tool, n, share)
            sel = kept & (d.abs() > 1e-4)
            ratio = (got[sel] / d[sel])
            scale = float(ratio.median())
            assert float((ratio - scale).abs().max()) < 1e-3 * scale, (tool, n)  # one scale per tensor
            scales[tool] = scale
        if not rescale:
            assert scales["paft"] == pytest.approx(1.0, rel=1e-4)
            assert scales["mergekit"] == pytest.approx(1.0, rel=1e-4)
        else:
            assert scales["paft"] == pytest.approx(1 / density, rel=1e-4)  # paft: DARE's 1/p
            kept_m = (b.get(n) - w) != 0  # mergekit 0.1.5: L1 norm of the delta restored
            l1 = float(d.abs().sum() / (d * kept_m).abs().sum())
            assert scales["mergekit"] == pytest.approx(l1, rel=1e-3)
            assert scales["mergekit"] == pytest.approx(scales["paft"], rel=0.02)
        checked += 1
    assert checked > 5


def test_lambda_scales_task_arithmetic_family():
    """mergekit multiplies the merged delta by ``lambda`` in every task-arithmetic-family method."""
    g = torch.Generator().manual_seed(0)
    ds = [torch.randn(8, 16, generator=g) for _ in range(2)]
    for method in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                   "magnitude_prune", "della", "della_linear"):
        kw = dict(density=0.5) if method != "task_arithmetic" else {}
        if method.startswith("breadcrumbs"):
            kw["gamma"] = 0.1
        one = merge_deltas(method, ds, [0.7, 0.4], generator=torch.Generator().manual_seed(1), **kw)
        half = merge_deltas(method, ds, [0.7, 0.4], generator=torch.Generator().manual_seed(1), lambda_=0.5, **kw)
        assert torch.allclose(half, 0.5 * one), method
    lin = merge_deltas("linear", ds, [1, 1])
    assert torch.equal(merge_deltas("linear", ds, [1, 1], lambda_=0.5), lin)  # mergekit's linear has no lambda
