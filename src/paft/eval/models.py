"""Evaluate a set of named models (folders, or base + LoRA adapter) on the same held-out data."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from paft.config import PaftConfig
from paft.data.formats import PreferenceExample, RankedExample, ranked_to_pairs
from paft.eval.metrics import completion_nll, exact_match, pair_logps, preference_scores


@dataclass
class ModelSpec:
    name: str
    path: Path  # an HF folder, or the base folder when ``adapter`` is set
    adapter: Path | None = None


def load_spec(spec: ModelSpec, cfg: PaftConfig, device: str):
    from paft.models import load_model

    model = load_model(spec.path, cfg.model.dtype, device, cfg.model.trust_remote_code)
    if spec.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(spec.adapter)).merge_and_unload()
    return model.eval()


def evaluate_models(specs: list[ModelSpec], cfg: PaftConfig, tok, sft_eval: list, pref_eval: list, *,
                    device: str = "cpu", reference: str | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Metrics per model; implicit rewards use ``reference`` (a spec name, default the first) as pi_ref.

    The preference metrics need pairs: held-out ranked lists count as their best-vs-worst pairs;
    unpaired rows (prompt, completion, label) leave them None, and the result says why under
    ``pref_metrics``.
    """
    e, d = cfg.eval, cfg.data
    if any(isinstance(x, RankedExample) for x in pref_eval):  # ranked lists: best vs worst of each
        pref_eval = ranked_to_pairs([x for x in pref_eval if isinstance(x, RankedExample)])
    sft_eval, pref_eval = sft_eval[: e.max_examples], pref_eval[: e.max_examples]
    unpaired = any(not isinstance(x, PreferenceExample) for x in pref_eval)
    if unpaired:
        pref_eval = []
    beta = e.beta or cfg.preference.beta
    reference = reference or specs[0].name
    ref_lp, results, samples = None, {}, {}
    order = sorted(specs, key=lambda s: s.name != reference)  # the reference first, to score the others
    for i, spec in enumerate(order):
        start = time.perf_counter()
        model = load_spec(spec, cfg, device)
        if progress:
            progress(spec.name, i, len(order))
        em, gen = exact_match(model, tok, sft_eval, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                              max_prompt_tokens=d.max_prompt_length)
        nll = completion_nll(model, tok, sft_eval, max_length=d.max_length, batch_size=e.batch_size)
        if unpaired:
            pref = {"pref_accuracy": None, "reward_margin": None, "reward_accuracy": None}
        else:
            lp = pair_logps(model, tok, pref_eval, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                            batch_size=e.batch_size)
            if spec.name == reference:
                ref_lp = lp
            scores = preference_scores(lp, ref_lp, beta)
            pref = {"pref_accuracy": scores.accuracy, "reward_margin": scores.reward_margin,
                    "reward_accuracy": scores.reward_accuracy}
        results[spec.name] = {"sft_exact_match": em, "sft_nll": nll, **pref,
                              "eval_s": round(time.perf_counter() - start, 2)}
        samples[spec.name] = gen[:8]
        del model
    out = {"models": {s.name: results[s.name] for s in specs}, "reference": reference, "beta": beta,
           "n_sft_eval": len(sft_eval), "n_pref_eval": len(pref_eval), "samples": samples}
    if unpaired:
        out["pref_metrics"] = ("held-out preference data is unpaired (prompt, completion, label); "
                               "pref_accuracy and the reward metrics need pairs")
    return out
