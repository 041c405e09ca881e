"""The chunked merge engine equals the whole-tensor methods bit for bit, whatever the chunking and threads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from paft.errors import PaftError
from paft.merge import methods
from paft.merge.engine import ShardWriter
from paft.merge.mergekit_config import plan_from_flags
from paft.merge.standalone import run_merge
from paft.merge.methods import ChunkedRandom, merge_deltas, trim_magnitude
from paft.merge.streaming import TopK, _bits, _top_bucket
from paft.methods.merging import MERGE_METHODS

SHAPES = {"emb": (37, 24), "w": (24, 24), "norm": (24,), "scalar": ()}


def _merge(base, branches, weights, method, *, out_dir, density=None, seed=0, dtype=None, force=False, workers=None,
           progress=None, **params):
    """A run's merge: the plan its merge section builds, through the one entry point."""
    plan = plan_from_flags(base, branches, method, weights=weights, density=density, params=params, seed=seed,
                           dtype=dtype)
    return run_merge(plan, out_dir, force=force, workers=workers, progress=progress)


def _write(folder, state):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture
def models(tmp_path):
    """A float32 base and three full checkpoints: dense, sparse (90% exact zeros), and one with tied magnitudes."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    dense = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    sparse = {k: v + 0.1 * torch.randn(v.shape, generator=g) * (torch.rand(v.shape, generator=g) < 0.1)
              for k, v in base.items()}
    # deltas in {-0.5, 0.25, 0.5, 1}: thresholds fall inside runs of equal magnitudes
    levels = torch.tensor([-0.5, 0.25, 0.5, 1.0])
    tied = {k: v + levels[torch.randint(0, 4, v.shape, generator=g)] for k, v in base.items()}
    return {"root": tmp_path, "base": base, "paths": {n: _write(tmp_path / n, s) for n, s in
                                                       (("base", base), ("dense", dense), ("sparse", sparse),
                                                        ("tied", tied))}}


def _want(models, names, method, weights, density, seed, **params):
    base = models["base"]
    out = {}
    for k, w in base.items():
        deltas = [load_file(models["paths"][n] / "model.safetensors")[k] - w for n in names]
        out[k] = w + merge_deltas(method, deltas, weights, density=density, generator=ChunkedRandom(seed, k),
                                  base=w, **params)
    return out


@pytest.mark.parametrize("method", sorted(n for n, s in MERGE_METHODS.items() if s.streams))
@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_streamed_methods_equal_whole_tensor_bitwise(models, method, chunk, monkeypatch):
    monkeypatch.setattr(methods, "CHUNK_NUMEL", chunk)  # 7 entries: many chunks, rows split unevenly
    names, weights = ["dense", "sparse", "tied"], [0.7, 0.5, 0.4]
    density = [0.3, 0.5, 0.45]
    params = {"gamma": 0.1} if method.startswith("breadcrumbs") else {}
    out = models["root"] / f"out-{method}-{chunk}"
    _merge(models["paths"]["base"], [models["paths"][n] for n in names], weights, method,
                    density=density, seed=5, out_dir=out, workers=3, **params)
    got = load_file(out / "model.safetensors")
    want = _want(models, names, method, weights, density, 5, **params)
    for k in SHAPES:
        assert got[k].shape == want[k].shape
        assert torch.equal(got[k], want[k]), (method, k, (got[k] - want[k]).abs().max())


def test_thread_count_and_chunking_do_not_change_random_masks(models, monkeypatch):
    monkeypatch.setattr(methods, "CHUNK_NUMEL", 50)
    outs = []
    for workers in (1, 2, 4):
        out = models["root"] / f"dare-{workers}"
        _merge(models["paths"]["base"], [models["paths"]["dense"], models["paths"]["tied"]], [1.0, 1.0],
                        "dare_ties", density=0.4, seed=9, out_dir=out, workers=workers)
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1] == outs[2]
    other = models["root"] / "dare-seed"
    _merge(models["paths"]["base"], [models["paths"]["dense"], models["paths"]["tied"]], [1.0, 1.0],
                    "dare_ties", density=0.4, seed=10, out_dir=other, workers=2)
    assert (other / "model.safetensors").read_bytes() != outs[0]


def test_dare_keeps_the_density_share(models):
    d = torch.ones(400, 300)
    kept = (methods.dare_drop(d, 0.3, ChunkedRandom(0, "x")) != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.005  # 120k draws: 4 standard deviations is 0.0053


def test_radix_threshold_matches_kthvalue_on_awkward_values():
    g = torch.Generator().manual_seed(3)
    d = torch.randn(5000, generator=g) * torch.logspace(-40, 3, 5000)  # denormals to large values
    d[::7] = 0.0
    d[1::11] = -0.0
    mag = d.abs()
    hist = torch.bincount(_bits(mag) >> 16, minlength=1 << 15)
    for k in (1, 17, 2500, 4000, 4999):
        t = TopK(k, mag.numel())
        t.bucket, _, t.bucket_need = _top_bucket(hist, k)
        bits = _bits(mag)
        low = torch.bincount(bits[(bits >> 16) == t.bucket] & 0xFFFF, minlength=1 << 16)
        lo, _, _ = _top_bucket(low, t.bucket_need)
        value = torch.tensor([(t.bucket << 16) | lo], dtype=torch.int32).view(torch.float32).item()
        assert value == torch.kthvalue(mag, mag.numel() - k + 1).values.item()


def test_ties_at_the_threshold_keep_the_lowest_indices(models, monkeypatch):
    """Equal magnitudes straddling the cut: the kept ones are the first in flat order, across chunks."""
    monkeypatch.setattr(methods, "CHUNK_NUMEL", 5)
    base = {"w": torch.zeros(12, 4)}
    delta = torch.tensor([1.0, -1.0] * 24).view(12, 4) * torch.tensor([2.0] * 8 + [1.0] * 40).view(12, 4)
    _write(models["root"] / "tb", base)
    _write(models["root"] / "td", {"w": delta})
    out = models["root"] / "tout"
    _merge(models["root"] / "tb", [models["root"] / "td"], [1.0], "magnitude_prune", density=0.5,
                    out_dir=out, workers=2)
    got = load_file(out / "model.safetensors")["w"]
    assert torch.equal(got, trim_magnitude(delta, 0.5))
    assert int((got != 0).sum()) == 24 and got.view(-1)[:24].ne(0).all()


def test_nan_is_named_with_its_input(models):
    bad = dict(models["base"])
    bad["w"] = bad["w"].clone()
    bad["w"][3, 4] = float("nan")
    path = _write(models["root"] / "nan", bad)
    for method in ("ties", "task_arithmetic", "dare_linear"):
        with pytest.raises(PaftError, match=r"w: delta 0 contains NaN or inf \(input .*nan\)"):
            _merge(models["paths"]["base"], [path], [1.0], method, density=0.5,
                            out_dir=models["root"] / f"o-{method}", workers=2)
        assert not (models["root"] / f"o-{method}").exists()  # nothing half-written
    with pytest.raises(PaftError, match=r"w: base tensor contains NaN or inf"):
        _merge(path, [models["paths"]["dense"]], [1.0], "task_arithmetic", out_dir=models["root"] / "o2")


def test_shard_writer_refuses_missing_and_overflowing_rows(tmp_path):
    w = ShardWriter(tmp_path, [("a", (4, 3), torch.float32), ("b", (2,), torch.bfloat16)], 10**9)
    w.write_rows("a", 0, torch.zeros(2, 3))
    with pytest.raises(PaftError, match="overflow a"):
        w.write_rows("a", 3, torch.zeros(2, 3))
    with pytest.raises(PaftError, match="expected b in torch.bfloat16"):
        w.write("b", torch.zeros(2))
    w.write("b", torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(PaftError, match="got 24 of 48 bytes of a"):
        w.close()
