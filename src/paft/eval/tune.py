"""Merge tuning: an Optuna multi-objective study over merge method x weights x density (and ExPO/averaging alpha).

Each trial is a merge applied in memory to one loaded model (:class:`paft.merge.live.LiveMerge`) and scored on the
dev split with the log-likelihood metrics of ``paft.eval.metrics`` (no generation), so a candidate costs a merge and
a few batched forward passes. The study lives in an Optuna JournalStorage file: a killed tune resumes with the
trials it finished. What a trial's parameters merge is the caller's (:meth:`paft.pipeline.Run.tune` turns them into a
merge plan); this module owns the search space, the loop and the dev scoring. docs/tune.md describes it.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from paft.config import TUNE_ALPHA_FAMILIES, PaftConfig, TuneConfig
from paft.data.formats import PreferenceExample, RankedExample, ranked_to_pairs
from paft.errors import ConfigError, PaftError
from paft.data.tokenize import encode_pair, encode_sft
from paft.eval.harness import HarnessSuite
from paft.eval.metrics import preference_scores
from paft.device import torch_threads
from paft.eval.models import eval_threads, heldout_nll, heldout_pair_logps
from paft.methods.candidates import CANDIDATES, Recipe
from paft.methods.merging import MERGE_METHODS
from paft.methods.objectives import harness_objective, higher_is_better

STUDY = "paft-tune"


def suggest(trial, t: TuneConfig) -> dict[str, Any]:
    """One trial's parameters: a method, then what that method reads (a conditional search space)."""
    method = trial.suggest_categorical("method", list(t.methods))
    if method in TUNE_ALPHA_FAMILIES:
        lo, hi = t.alpha_range if method == "expo" else (0.0, 1.0)
        return {"method": method, f"{method}_alpha": trial.suggest_float(f"{method}_alpha", lo, hi)}
    params = {"method": method, "w_sft": trial.suggest_float("w_sft", *t.weight_range),
              "w_pref": trial.suggest_float("w_pref", *t.weight_range)}
    if MERGE_METHODS[method].sparsifier is not None:  # only methods that trim read a density
        params["density"] = trial.suggest_float("density", *t.density_range)
    return params


@dataclass(frozen=True)
class TrialMerge:
    """What a trial's parameters merge: a candidate recipe, with the weights and density of a merge method."""

    recipe: Recipe
    weights: list[float] | None = None
    density: float | None = None
    needs: tuple[str, ...] = ("sft", "preference")  # the trained branches it merges


def trial_merge(params: dict[str, Any]) -> TrialMerge:
    method = params["method"]
    if method in TUNE_ALPHA_FAMILIES:
        family = CANDIDATES[method]
        return TrialMerge(family.recipe(params[f"{method}_alpha"]), needs=family.needs)
    return TrialMerge(Recipe(method=method), [params["w_sft"], params["w_pref"]], params.get("density", 1.0))


def default_trial(cfg: PaftConfig) -> dict[str, Any] | None:
    """The run's own merge (the ``merge`` section) as a first trial, when the search space holds it: the front then
    shows whether tuning beat the PAFT default on the dev split."""
    t, m = cfg.tune, cfg.merge
    lo, hi = t.weight_range
    if m.method not in t.methods or not all(lo <= w <= hi for w in m.weights):
        return None
    out = {"method": m.method, "w_sft": m.weights[0], "w_pref": m.weights[1]}
    if MERGE_METHODS[m.method].sparsifier is not None:
        if not t.density_range[0] <= m.density <= t.density_range[1]:
            return None
        out["density"] = m.density
    return out


class DevScorer:
    """The tune objectives of a model on the dev split: SFT completion NLL and the preference-pair metrics
    (batched log-likelihoods, no generation). Implicit rewards take the model scored by :meth:`set_reference` (the base).
    A ``harness/TASK/METRIC`` objective runs that lm-eval task (its own rows, up to ``eval.harness_limit``: lm-eval
    tasks have no dev split of paft's) and adds all its ``harness/...`` metrics."""

    def __init__(self, cfg: PaftConfig, tok, sft_dev: list, pref_dev: list):
        self.cfg, self.tok = cfg, tok
        objectives = cfg.tune.objectives
        if any(isinstance(x, RankedExample) for x in pref_dev):  # ranked lists: best vs worst, as the evaluation
            pref_dev = ranked_to_pairs([x for x in pref_dev if isinstance(x, RankedExample)])
        self.sft, self.pref = sft_dev, [x for x in pref_dev if isinstance(x, PreferenceExample)]
        if "sft_nll" in objectives and not self.sft:
            raise ConfigError("data.dev_size: the run's SFT dev split (data/sft_dev.jsonl) is empty; tuning scores "
                              "sft_nll on it: set data.dev_size > 0 and redo the run with --force")
        pair_keys = [k for k in objectives if k != "sft_nll" and harness_objective(k) is None]
        if pair_keys and not self.pref:
            raise ConfigError("data.dev_size: the run's preference dev split holds no pairs; tune.objectives "
                              f"{', '.join(pair_keys)} need preference pairs")
        self.ref_lp = None
        # harness objectives: their tasks built once (data loaded, names checked) and run on every trial
        tasks = list(dict.fromkeys(h[0] for h in map(harness_objective, objectives) if h is not None))
        self.suite = None
        if tasks:
            e = cfg.eval
            try:
                self.suite = HarnessSuite.build(tasks, limit=e.harness_limit,
                                                batch_size=e.harness_batch_size or e.batch_size,
                                                chat_template=e.harness_chat_template)
            except PaftError as exc:
                raise type(exc)(f"tune.objectives: {exc}") from None

    def set_reference(self, model) -> dict[str, float]:
        """Score the implicit-reward reference (the base) and keep its pair log-probs."""
        out = self._score(model, reference=True)
        for key in self.cfg.tune.objectives:  # a harness key the task does not report: say so before any trial
            harness = harness_objective(key)
            if harness is not None and key not in out:
                task = harness[0]
                have = sorted(k for k in out if k.startswith(f"harness/{task}/") and "stderr" not in k)
                raise ConfigError(f"tune.objectives: {key!r} is not a metric the task reports; it gives "
                                  + (", ".join(have) if have else "none (is the task's name right?)"))
        return out

    def _encoded(self):
        """The dev rows tokenized once (every trial scores the same rows with the same tokenizer)."""
        if getattr(self, "_rows", None) is None:
            d = self.cfg.data
            self._rows = ([encode_sft(x, self.tok, d.max_length) for x in self.sft],
                          [encode_pair(x, self.tok, d.max_length, d.max_prompt_length) for x in self.pref])
        return self._rows

    def _budget(self) -> int:
        return self.cfg.eval.batch_size * self.cfg.data.max_length

    def _pair_logps(self, model):
        return heldout_pair_logps(model, self.tok, self._encoded()[1], self.pref, self.cfg, fast=self.cfg.eval.fast,
                                  budget=self._budget())

    def __call__(self, model) -> dict[str, float]:
        return self._score(model)

    def _score(self, model, reference: bool = False) -> dict[str, float]:
        """The objectives of ``model``; ``reference``: its pair log-probs become the reference's too (one forward)."""
        e = self.cfg.eval
        out: dict[str, float] = {}
        threads = torch_threads(eval_threads(self.cfg)) if e.fast and _on_cpu(model) else contextlib.nullcontext()
        with threads:
            if self.sft:
                out["sft_nll"] = heldout_nll(model, self.tok, self._encoded()[0], self.sft, self.cfg, fast=e.fast,
                                             budget=self._budget()).mean
            if self.pref:
                lp = self._pair_logps(model)
                if reference:
                    self.ref_lp = lp
                s = preference_scores(lp, self.ref_lp, e.beta or self.cfg.preference.beta)
                out.update(pref_accuracy=s.accuracy, reward_margin=s.reward_margin,
                           reward_accuracy=s.reward_accuracy)
        if self.suite is not None:
            out.update(self.suite.run(model, self.tok)[0])
        return out


def _on_cpu(model) -> bool:
    return next(model.parameters()).device.type == "cpu"


def _optuna():
    import optuna  # lazily: a second of start-up that only tuning needs

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def open_study(path: Path, t: TuneConfig, done: int = 0):
    """The study stored in the journal file ``path`` (created or reopened); the sampler's seed moves on by the
    trials already run, so a resumed study does not re-propose its first points."""
    optuna = _optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    seed = t.seed + done
    if t.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(population_size=max(4, min(50, t.trials // 2)), seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, t.trials // 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JournalFileBackend's experimental warning
        storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.create_study(study_name=STUDY, storage=storage, load_if_exists=True, sampler=sampler,
                               directions=["maximize" if higher_is_better(k) else "minimize" for k in t.objectives])


def finished(study) -> list:
    return [tr for tr in study.trials if tr.state.is_finished()]


def run_study(path: Path, t: TuneConfig, score: Callable[[dict[str, Any]], dict[str, float]], *,
              first: dict[str, Any] | None = None,
              progress: Callable[[int, int, str], None] = lambda i, n, note: None) -> list:
    """Ask/tell up to ``t.trials`` finished trials (those in the journal count); every finished trial.

    ``score(params)`` merges and scores one candidate; a ``PaftError`` from it (a merge its parameters break) fails
    that trial with the error kept, not the tune. A trial left running by a killed process is failed first.
    """
    _optuna()
    from optuna.trial import TrialState

    probe = open_study(path, t)
    done = len(finished(probe))
    study = open_study(path, t, done) if done else probe
    for tr in study.trials:
        if tr.state == TrialState.RUNNING:  # its process was killed mid-trial
            study.tell(tr.number, state=TrialState.FAIL)
    if first is not None and not study.trials:
        study.enqueue_trial(first, user_attrs={"default": True})
    start = time.perf_counter()
    done = len(finished(study))
    progress(done, t.trials, "")
    while done < t.trials and (t.timeout_s is None or time.perf_counter() - start < t.timeout_s):
        trial = study.ask()
        params = suggest(trial, t)
        began = time.perf_counter()
        try:
            metrics = score(params)
        except PaftError as exc:
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=TrialState.FAIL)
            metrics = None
        if metrics is not None:
            trial.set_user_attr("metrics", metrics)
            trial.set_user_attr("seconds", round(time.perf_counter() - began, 3))
            values = [metrics.get(k) for k in t.objectives]
            if any(v is None or math.isnan(v) for v in values):
                trial.set_user_attr("error", "an objective is missing or NaN")
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, values)
        done += 1
        progress(done, t.trials, params["method"])
    return finished(study)


def trial_rows(trials: list, front: set[int]) -> list[dict[str, Any]]:
    """Each finished trial as a trials.json row: number, params, dev metrics, seconds, state, on_front."""
    return [{"number": tr.number, "params": tr.params, "metrics": tr.user_attrs.get("metrics"),
             "seconds": tr.user_attrs.get("seconds"), "state": tr.state.name, "on_front": tr.number in front,
             **({"error": tr.user_attrs["error"]} if "error" in tr.user_attrs else {}),
             **({"default": True} if tr.user_attrs.get("default") else {})} for tr in trials]
