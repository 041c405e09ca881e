"""Evaluate a set of named models (folders, or base + LoRA adapter) on the same held-out data."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from paft.config import PaftConfig, ScorerConfig
from paft.data.demo import SYSTEM
from paft.data.formats import PreferenceExample, RankedExample, ranked_to_pairs, unique_prompts
from paft.data.tokenize import encode_pair, encode_sft
from paft.device import torch_threads
from paft.errors import ConfigError, ModelError, PaftError
from paft.eval.harness import HarnessSuite
from paft.eval.judges import (harm_messages, harmlessness_metrics, load_harm_prompts, pairwise_judge,
                              pairwise_verdicts, refusal_judge, refusal_labels, rm_win_rate, win_rates)
from paft.eval.metrics import (SAMPLES, binomial_stderr, chat_examples, completion_nll, exact_match,
                               packed_pair_logps, pair_logps, preference_scores, sorted_nll)
from paft.io import usable_cores
from paft.merge.live import LiveMerge
from paft.merge.mergekit_config import MergePlan
from paft.models import load_model, load_tokenizer, resolve_model_dir
from paft.models.attention import attn_implementation, packing_unsupported
from paft.models.folders import check_weights
from paft.models.generation import generate_replies
from paft.models.reference import ReferenceLogps, reference_cache_path, reference_identity
from paft.scoring import build_scorer


@dataclass
class ModelSpec:
    name: str
    path: Path  # an HF folder, or the base folder when ``adapter`` is set
    adapter: Path | None = None
    tokenizer: Path | None = None  # the model's own tokenizer folder; None: the tokenizer evaluate_models is given
    plan: MergePlan | None = None  # a merge applied in memory to ``path`` (its base): no model folder is written


def load_spec(spec: ModelSpec, cfg: PaftConfig, device: str):
    model = load_model(spec.path, cfg.model.dtype, device, cfg.model.trust_remote_code)
    if spec.plan is not None:
        model = LiveMerge(model, spec.path).apply(spec.plan)
    if spec.adapter is not None:
        from peft import PeftModel  # heavy: only when an adapter is evaluated

        check_weights(spec.adapter)
        model = PeftModel.from_pretrained(model, str(spec.adapter)).merge_and_unload()
    return model.eval()


def needs_chat_template(cfg: PaftConfig) -> bool:
    """Whether any configured metric renders chat prompts (the harness alone does not, by default)."""
    e = cfg.eval
    return bool(e.heldout or e.reward_model or e.judge_model or e.harmlessness or e.harness_chat_template)


def load_eval_tokenizer(path: Path, cfg: PaftConfig):
    """The tokenizer at ``path``; a chat template is required only when a configured metric uses one."""
    from transformers import AutoTokenizer  # heavy: paft's CLI starts without it

    try:
        if needs_chat_template(cfg):
            return load_tokenizer(path, cfg.model.trust_remote_code)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load its tokenizer: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _reply_prompts(pref_eval: list, sft_eval: list, n: int) -> list[list[dict]]:
    """Held-out prompts for the reply metrics: the preference prompts (else the SFT ones), distinct, at most n."""
    rows = [x.prompt for x in pref_eval if getattr(x, "prompt", None)]
    if not rows:
        rows = [e.messages[:-1] for e in sft_eval if e.messages and e.messages[-1]["role"] == "assistant"]
    return unique_prompts(rows)[:n]


def _prefixed(key: str, exc: PaftError) -> PaftError:
    return type(exc)(f"{key}: {exc}")


class _Extras:
    """The reply-based metrics' shared parts, loaded once before any model: reward model, judge, prompts."""

    def __init__(self, cfg: PaftConfig, names: list[str], pref_eval: list, sft_eval: list, device: str,
                 base_dir: Path | None):
        e = cfg.eval
        self.rm = self.pair_judge = self.harm_judge = None
        wants_replies = bool(e.reward_model or e.judge_model)
        if wants_replies and e.judge_reference not in names:
            raise ConfigError(f"eval.judge_reference: {e.judge_reference!r} is not one of the evaluated models "
                              f"({', '.join(names)})")
        self.prompts = _reply_prompts(pref_eval, sft_eval, e.max_examples) if wants_replies else []
        if wants_replies and not self.prompts:
            raise ConfigError("eval.reward_model/judge_model: the held-out data has no prompts to reply to")
        if e.reward_model:
            try:
                self.rm = build_scorer(ScorerConfig(kind="reward_model", path=e.reward_model, batch_size=e.batch_size),
                                       base_model_dir=base_dir, device=device,
                                       trust_remote_code=cfg.model.trust_remote_code)
            except PaftError as exc:
                raise _prefixed("eval.reward_model", exc) from None
        if e.judge_model:
            try:
                judge_dir = resolve_model_dir(e.judge_model)
                model = load_model(judge_dir, cfg.model.dtype, device, cfg.model.trust_remote_code).eval()
                tok = load_tokenizer(judge_dir, cfg.model.trust_remote_code)
                self.pair_judge = pairwise_judge(model, tok, batch_size=e.batch_size)
                self.harm_judge = refusal_judge(model, tok, batch_size=e.batch_size)
            except PaftError as exc:
                raise _prefixed("eval.judge_model", exc) from None
        self.harm = []
        if e.harmlessness:
            self.harm = load_harm_prompts()
            self.harm_prompts = harm_messages(self.harm, SYSTEM)
        self.ref_replies: list[str] | None = None
        self.ref_rewards: list[float] | None = None
        self.token_budget: int | None = None  # the fast path's greedy batches (``generate_replies``)

    def metrics(self, is_ref: bool, model, tok, cfg: PaftConfig) -> tuple[dict, dict]:
        e, d = cfg.eval, cfg.data
        gen = dict(max_new_tokens=e.reply_max_new_tokens or e.max_new_tokens, batch_size=e.batch_size,
                   max_prompt_tokens=d.max_prompt_length, token_budget=self.token_budget)
        row: dict[str, Any] = {}
        samples: dict[str, Any] = {}
        if self.prompts:
            replies = generate_replies(model, tok, self.prompts, **gen)
            if is_ref:
                self.ref_replies = replies
            sample = [{"prompt": p[-1]["content"], "reply": r} for p, r in zip(self.prompts, replies)]
            if self.rm is not None:
                rewards = self.rm(self.prompts, replies)
                if is_ref:
                    self.ref_rewards = rewards
                row["rm_reward"] = sum(rewards) / len(rewards)
                row["rm_win_rate"] = rm_win_rate(rewards, self.ref_rewards)
                for s, r in zip(sample, rewards):
                    s["reward"] = round(r, 4)
            if self.pair_judge is not None:
                verdicts = pairwise_verdicts(self.pair_judge, self.prompts, replies, self.ref_replies)
                row.update(win_rates(verdicts))
                for s, v in zip(sample, verdicts):
                    s["judge"] = {1: "win", 0: "tie", -1: "loss"}[v]
            samples["replies"] = sample[:8]
        if self.harm:
            replies = generate_replies(model, tok, self.harm_prompts, **gen)
            labels = refusal_labels(replies, self.harm_prompts, self.harm_judge)
            row.update(harmlessness_metrics(self.harm, labels, self.harm_judge is not None))
            rows = [{"kind": h.kind, "prompt": h.prompt, "reply": r, "label": lab}
                    for h, r, lab in zip(self.harm, replies, labels)]
            samples["harmlessness"] = ([x for x in rows if x["kind"] == "harmful"][:5]
                                       + [x for x in rows if x["kind"] == "benign"][:3])
        return row, samples

    def describe(self, cfg: PaftConfig) -> dict[str, Any]:
        e = cfg.eval
        out: dict[str, Any] = {}
        if self.prompts:
            out["replies"] = {"prompts": len(self.prompts), "reference": e.judge_reference,
                              "max_new_tokens": e.reply_max_new_tokens or e.max_new_tokens,
                              "reward_model": e.reward_model, "judge_model": e.judge_model}
        if self.harm:
            out["harmlessness"] = {
                "harmful_prompts": sum(h.kind == "harmful" for h in self.harm),
                "benign_prompts": sum(h.kind == "benign" for h in self.harm),
                "scorer": f"judge {e.judge_model}" if self.harm_judge is not None
                else "refusal phrases (heuristic, paft.models.generation.REFUSAL_PHRASES)"}
        return out


def eval_threads(cfg: PaftConfig) -> int:
    """CPU threads of the fast evaluation: ``run.threads``, else ``OMP_NUM_THREADS`` (a sweep cell's share of the
    machine), else every core this process may run on (its affinity mask)."""
    if cfg.run.threads:
        return cfg.run.threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else usable_cores()


def eval_reference_identity(spec: ModelSpec, cfg: PaftConfig, device: str) -> str | None:
    """Key of the on-disk cache of the reference's held-out log-probs: its weights (as training's reference cache
    keys them: base files, adapter hash), dtype and device kind, marked ``eval`` (evaluation runs without training's
    autocast). None for an in-memory merge, whose weights no file names, and for weights not in safetensors files:
    their log-probs are kept for the call only.
    The rows themselves are keyed by their tokens (``paft.models.reference``), so other data, another tokenizer or
    other length limits never read a stale value."""
    if spec.plan is not None or not any(Path(spec.path).glob("*.safetensors")):  # no weight files to key it by
        return None
    weights = reference_identity(spec.path, dtype=cfg.model.dtype, bf16=False, init_adapter=spec.adapter)
    kind = device.split(":")[0]
    return hashlib.sha256(f"eval|{weights}|{kind}".encode()).hexdigest()[:24]


def packs_pairs(model, max_length: int) -> bool:
    """Whether the fast path's packed layout runs on ``model``: per-document SDPA attention and one mask for every
    layer (eager attention would materialise a [tokens x tokens] score matrix per head; flash takes no mask)."""
    return attn_implementation(model) == "sdpa" and packing_unsupported(model, max_length) is None


def evaluate_models(specs: list[ModelSpec], cfg: PaftConfig, tok, sft_eval: list, pref_eval: list, *,
                    device: str = "cpu", reference: str | None = None, base_dir: Path | None = None,
                    progress: Callable[[str, int, int], None] | None = None,
                    fast: bool | None = None, score_reference: bool = True) -> dict[str, Any]:
    """Metrics per model; implicit rewards use ``reference`` (a spec name, default the first) as pi_ref.

    The preference metrics need pairs: held-out ranked lists count as their best-vs-worst pairs;
    unpaired rows (prompt, completion, label) leave them None, and the result says why under
    ``pref_metrics``. ``eval.harness_tasks`` (``paft.eval.harness``), ``eval.reward_model``,
    ``eval.judge_model`` and ``eval.harmlessness`` (``paft.eval.judges``) add their metrics to
    each model's row; their tasks, data and models are checked and loaded before the first model,
    so a bad name fails at once. ``base_dir``: the base of a reward model whose adapter names none.
    ``tok`` serves every spec without a ``tokenizer`` of its own.

    ``fast`` (default ``eval.fast``): held-out rows tokenized once per tokenizer, the packed layout for pair
    log-probs and NLL (``paft.eval.metrics``), greedy replies in token-budget batches with a KV cache
    (``paft.models.generation``), the reference's pair log-probs cached on disk (``eval_reference_identity``) and
    reused by every later call on the same data (candidates, searches), and all usable CPU threads. False: the
    plain path, the same numbers (tests/test_eval_fast.py), kept for comparison (benchmarks/eval_bench.py).

    ``score_reference`` False: the reference gives only its pair log-probs (the implicit rewards' pi_ref, from the
    reference cache when it is there) and gets no row: for callers that already hold its metrics (candidates, tune).
    """
    e, d = cfg.eval, cfg.data
    fast = e.fast if fast is None else fast
    if any(isinstance(x, RankedExample) for x in pref_eval):  # ranked lists: best vs worst of each
        pref_eval = ranked_to_pairs([x for x in pref_eval if isinstance(x, RankedExample)])
    sft_eval, pref_eval = sft_eval[: e.max_examples], pref_eval[: e.max_examples]
    unpaired = any(not isinstance(x, PreferenceExample) for x in pref_eval)
    reply_source = pref_eval
    if unpaired:
        pref_eval = []
    beta = e.beta or cfg.preference.beta
    reference = reference or specs[0].name
    suite = None
    if e.harness_tasks:
        suite = HarnessSuite.build(e.harness_tasks, limit=e.harness_limit,
                                   batch_size=e.harness_batch_size or e.batch_size,
                                   chat_template=e.harness_chat_template)
    extras = _Extras(cfg, [s.name for s in specs], reply_source, sft_eval, device, base_dir)
    budget = e.batch_size * d.max_length  # tokens per forward: the plain path's widest batch
    if fast:
        extras.token_budget = budget
    threads = torch_threads(eval_threads(cfg)) if fast and device == "cpu" else contextlib.nullcontext()
    # per tokenizer: the held-out rows, tokenized once (the tokenizer is kept, so its id is never reused)
    encoded: dict[int, tuple[Any, list, list]] = {}

    def rows(mtok) -> tuple[list, list]:
        if id(mtok) not in encoded:
            encoded[id(mtok)] = (mtok, [encode_sft(x, mtok, d.max_length) for x in sft_eval],
                                 [encode_pair(x, mtok, d.max_length, d.max_prompt_length) for x in pref_eval])
        return encoded[id(mtok)][1:]

    ref_lp, results, samples, harness_details, reply_samples = None, {}, {}, {}, {}
    # the implicit-reward reference first, then the judge's reference: the others are scored against them
    order = sorted(specs, key=lambda s: (s.name != reference, s.name != e.judge_reference))
    with threads:
        for i, spec in enumerate(order):
            start = time.perf_counter()
            model = load_spec(spec, cfg, device)
            mtok = load_eval_tokenizer(spec.tokenizer, cfg) if spec.tokenizer is not None else tok
            if progress:
                progress(spec.name, i, len(order))
            row: dict[str, Any] = {}
            if not score_reference and spec.name == reference:
                if e.heldout and not unpaired:
                    ref_lp = heldout_pair_logps(model, mtok, rows(mtok)[1], pref_eval, cfg, fast=fast, budget=budget,
                                                cache=spec, device=device)
                del model
                continue
            if e.heldout:
                # fast: the NLL forward's argmax decides most exact-match rows (``exact_match``'s teacher)
                nll = heldout_nll(model, mtok, rows(mtok)[0], sft_eval, cfg, fast=fast, budget=budget, argmax=fast)
                em, gen = exact_match(model, mtok, sft_eval, max_new_tokens=e.max_new_tokens,
                                      batch_size=e.batch_size, max_prompt_tokens=d.max_prompt_length,
                                      token_budget=budget if fast else None,
                                      teacher=(rows(mtok)[0], nll.argmax) if fast else None)
                if unpaired:
                    pref = {"pref_accuracy": None, "reward_margin": None, "reward_accuracy": None}
                else:
                    # the reference's log-probs are read from / written to the reference cache
                    lp = heldout_pair_logps(model, mtok, rows(mtok)[1], pref_eval, cfg, fast=fast, budget=budget,
                                            cache=spec if spec.name == reference else None, device=device)
                    if spec.name == reference:
                        ref_lp = lp
                    pref = preference_scores(lp, ref_lp, beta).metrics()
                row.update({"sft_exact_match": em,
                            "sft_exact_match_stderr": binomial_stderr(em, len(chat_examples(sft_eval))),
                            "sft_nll": nll.mean, "sft_nll_stderr": nll.stderr, **pref})
                samples[spec.name] = gen[:SAMPLES]
            if suite is not None:
                flat, details = suite.run(model, mtok)
                row.update(flat)
                harness_details[spec.name] = details
            extra_row, extra_samples = extras.metrics(spec.name == e.judge_reference, model, mtok, cfg)
            row.update(extra_row)
            if extra_samples:
                reply_samples[spec.name] = extra_samples
            row["eval_s"] = round(time.perf_counter() - start, 2)
            results[spec.name] = row
            del model
    out = {"models": {s.name: results[s.name] for s in specs if s.name in results}, "reference": reference,
           "beta": beta,
           "n_sft_eval": len(sft_eval) if e.heldout else 0, "n_pref_eval": len(pref_eval) if e.heldout else 0,
           "samples": samples}
    if unpaired and e.heldout:
        out["pref_metrics"] = ("held-out preference data is unpaired (prompt, completion, label); "
                               "pref_accuracy and the reward metrics need pairs")
    if suite is not None:
        out["harness"] = {"tasks": suite.shots(), "limit": e.harness_limit, "chat_template": e.harness_chat_template,
                          "details": harness_details}
    out.update(extras.describe(cfg))
    if reply_samples:
        out["reply_samples"] = reply_samples
    return out


def heldout_nll(model, tok, encoded: list, examples: list, cfg: PaftConfig, *, fast: bool, budget: int,
                argmax: bool = False):
    """Held-out completion NLL as the evaluation computes it: length-sorted token-budget batches of the encoded rows
    (``fast``; ``argmax``: with each row's argmax at its label positions), else the plain padded path; the same
    numbers either way."""
    if fast:
        return sorted_nll(model, encoded, pad_id=tok.pad_token_id, token_budget=budget, argmax=argmax)
    return completion_nll(model, tok, examples, max_length=cfg.data.max_length, batch_size=cfg.eval.batch_size)


def heldout_pair_logps(model, tok, encoded: list, examples: list, cfg: PaftConfig, *, fast: bool, budget: int,
                       cache: ModelSpec | None = None, device: str = "cpu"):
    """[N, 2] pair log-probs as the evaluation computes them: the packed layout (the prompt once per pair) where
    ``fast`` and the model allow it, else padded rows. ``cache``: the reference model, whose log-probs are read
    from and written to the on-disk reference cache (packed path only)."""
    d, e = cfg.data, cfg.eval
    if fast and packs_pairs(model, d.max_length):
        forward = None
        if cache is not None:
            ident = eval_reference_identity(cache, cfg, device)
            forward = ReferenceLogps(reference_cache_path(ident) if ident else None, model=model)
        # rows of 2 x max_length: the [T x T] masks stay small however large the budget
        lp = packed_pair_logps(model, encoded, pad_id=tok.pad_token_id, token_budget=budget, forward=forward,
                               pack_length=2 * d.max_length)
        if forward is not None:
            forward.save()
        return lp
    return pair_logps(model, tok, examples, max_length=d.max_length, max_prompt_length=d.max_prompt_length,
                      batch_size=e.batch_size)
