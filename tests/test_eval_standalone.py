"""`paft eval MODEL...`: which folders become which models, and the one-line errors (no model is run)."""

import json

import pytest

from paft.errors import ModelError, PaftError
from paft.eval.standalone import folder_specs


def _model(path, tokenizer=True):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    if tokenizer:
        (path / "tokenizer_config.json").write_text("{}")
    return path


def _adapter(path, base, task_type="CAUSAL_LM"):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base),
                                                          "task_type": task_type}))
    return path


def test_names_bases_and_tokenizers(tmp_path):
    base = _model(tmp_path / "base-model")
    full = _model(tmp_path / "runs" / "a" / "merged")
    ad1 = _adapter(tmp_path / "runs" / "a" / "sft" / "adapter", base)
    ad2 = _adapter(tmp_path / "runs" / "b" / "sft" / "adapter", tmp_path / "elsewhere")
    specs = folder_specs([full, ad1, ad2], base)
    assert [s.name for s in specs] == ["base", "merged", "a/sft", "b/sft"]  # adapter -> parent; clashes qualified
    assert specs[2].path == base and specs[2].adapter == ad1 and specs[2].tokenizer == base
    assert specs[1].path == full and specs[1].adapter is None and specs[1].tokenizer == full
    # without --base: an adapter's own local base; the base is not evaluated then
    specs = folder_specs([ad1], None)
    assert [(s.name, s.path) for s in specs] == [("sft", base)]
    assert [s.name for s in folder_specs([base], base)] == ["base-model"]  # the base given as a model: once


def test_folder_errors_are_one_line(tmp_path):
    base = _model(tmp_path / "base")
    with pytest.raises(ModelError, match="not a local model folder; pass --base"):
        folder_specs([_adapter(tmp_path / "x" / "adapter", "org/remote-model")], None)
    with pytest.raises(ModelError, match="reward model"):
        folder_specs([_adapter(tmp_path / "rm" / "adapter", base, "SEQ_CLS")], base)
    with pytest.raises(ModelError, match="no tokenizer files; pass --base"):
        folder_specs([_model(tmp_path / "bare", tokenizer=False)], None)
    with pytest.raises(ModelError, match="neither a model folder"):
        (tmp_path / "empty").mkdir()
        folder_specs([tmp_path / "empty"], None)
    with pytest.raises(ModelError, match="not a folder"):
        folder_specs([tmp_path / "missing"], None)
    with pytest.raises(PaftError, match="given twice"):
        folder_specs([base, base], None)


@pytest.mark.parametrize("method", ["dpo", "lipo"])
def test_heldout_rows_are_the_ones_a_run_writes(tmp_path, method):
    """`paft eval` splits the data in memory as the run's data stage does (no run folder, no pipeline)."""
    from paft.config import load_config
    from paft.data.loading import load_examples
    from paft.data.prepare import prepare_data
    from paft.eval.standalone import _heldout_data

    cfg = load_config(preset="tiny", overrides=[f"preference.method={method}"])
    summary = prepare_data(cfg.data, tmp_path, seed=cfg.run.seed, ranked=method == "lipo")
    assert summary["preference"]["format"] == ("demo_ranked" if method == "lipo" else "demo")
    written = [load_examples(str(tmp_path / f"{kind}_eval.jsonl"), kind).examples for kind in ("sft", "preference")]
    assert list(_heldout_data(cfg)) == written and len(written[1]) == cfg.data.demo.preference_eval
