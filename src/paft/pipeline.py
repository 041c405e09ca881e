"""The PAFT run: data -> SFT and preference branches (in parallel) -> sequential baseline ->
sparsity -> merge -> evaluation -> training-free candidates -> merge tuning (``tune.trials`` > 0) -> report, in one
output folder.

Each stage writes its outputs atomically and is skipped when they exist, so a
killed run resumes where it stopped (a branch killed mid-training resumes from its
last Trainer checkpoint). The folder's ``config.yaml`` pins the config: running a
different config into the same folder is refused unless ``--force``.
"""

from __future__ import annotations

import os
import shutil
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from paft.config import PaftConfig, config_identity, read_run_config
from paft.data.loading import load_examples
from paft.data.prepare import check_sources_unchanged, prepare_data
from paft.device import resolve_device
from paft.errors import ConfigError, PaftError
from paft.eval.models import ModelSpec, evaluate_models
from paft.eval.tune import DevScorer, default_trial, run_study, trial_merge, trial_rows
from paft.io import (LOCK_NAME, lock_folder, package_versions, read_json, sha256_file, write_json_atomic,
                     write_text_atomic)
from paft.merge.live import LiveMerge
from paft.merge.mergekit_config import plan_from_flags
from paft.merge.standalone import PreparedMerge, run_merge
from paft.methods.candidates import (CANDIDATES, MAIN_MODELS, Recipe, branch_weights, candidate_name, method_params,
                                     settings)
from paft.methods.losses import get_loss
from paft.methods.objectives import HELDOUT_METRICS, higher_is_better, pareto_front, pick_point
from paft.methods.remedies import REMEDIES, remedy_branches
from paft.models import load_model, load_tokenizer, resolve_model_dir
from paft.models.folders import is_adapter, is_model
from paft.progress import ProgressUI
from paft.report import write_report
from paft.sparsity import model_sparsity
from paft.train.branch import branch_done, branch_output, preference_examples, read_summary
from paft.train.launch import run_branch
from paft.train.reward import reward_pairs, train_reward
from paft.workers import Job, RayPool, WorkerPool, visible_gpus

# the data stage's outputs feed every later stage: redoing it alone could leave branches trained on other data
REDO_DATA = "pass --force to redo the run from the data stage"

# branch -> (data kind, the branch whose output it starts from); Run.branches adds the configured trained remedies
BRANCHES = {"sft": ("sft", None), "preference": ("preference", None), "sequential": ("preference", "sft")}


class Run:
    def __init__(self, cfg: PaftConfig, ui: ProgressUI | None = None):
        self.cfg = cfg
        self.root = Path(cfg.run.output_dir)
        self.ui = ui or ProgressUI(enabled=False)
        self.data_dir, self.merged_dir = self.root / "data", self.root / "merged"
        self.sequential_model_dir = self.root / "sequential" / "model"
        self._sources_checked = False  # data files compared with their recorded hashes (once per process)

    @cached_property
    def branches(self) -> dict[str, tuple[str, str | None]]:
        """The branch table: the main branches, then one per trained remedy in ``candidates.trained.names``."""
        return {**BRANCHES, **remedy_branches(self.cfg.candidates.trained.names)}

    # ------------------------------------------------------------------ paths
    def branch_dir(self, name: str) -> Path:
        return self.root / name

    def adapter(self, name: str) -> Path:
        return self.root / name / "adapter"

    def output(self, name: str) -> Path:
        """A trained branch's output: its LoRA/QLoRA adapter folder, or its model folder (``adapter: full``)."""
        return branch_output(self.branch_dir(name))

    def _is_full(self, name: str) -> bool:
        return self.output(name).name == "model"

    def _has_output(self, name: str) -> bool:
        out = self.output(name)
        return is_model(out) if out.name == "model" else is_adapter(out)

    # ------------------------------------------------------------------ setup
    def _kept(self) -> set[Path]:
        """What --force and a redo never remove: the config's input files inside the folder, and the lock."""
        return _input_paths(self.cfg, self.root) | {(self.root / LOCK_NAME).resolve()}

    def prepare(self, check_device: bool = True, redo: tuple[str, ...] = ()) -> None:
        """Lock, create or reopen the output folder; refuse a different config unless forced. ``check_device``:
        a ``run.device`` this machine lacks fails now, before any data or model work (merge, sparsity and report
        need none: they run on the CPU). ``redo``: outputs (names in the folder) removed once it is locked."""
        lock_folder(self.root)  # a second paft process on this folder stops here, naming the holder
        for name in redo:
            _remove_outputs(self.root / name, self._kept())
        if check_device:
            _ = self.device
        cfg_path = self.root / "config.yaml"
        mine = config_identity(self.cfg)
        if cfg_path.exists():
            try:
                theirs = config_identity(read_run_config(self.root))
            except ConfigError:
                if not self.cfg.run.force:
                    raise
                theirs = None  # damaged: --force starts the folder over, since no output can be vouched for
            diff = sorted(_diff_keys(theirs, mine)) if theirs is not None else []
            stale = _stale_outputs({k.split(".")[0] for k in diff}) if theirs is not None else None
            if stale is not None:  # only outputs that exist need redoing
                stale = [n for n in stale if (self.root / n).exists()]
            if theirs is not None and theirs != mine and (set(diff) <= RESUMABLE_KEYS or stale == []):
                pass  # nothing the change affects exists yet (more tune trials extend the study)
            elif theirs != mine:
                if not self.cfg.run.force:
                    what = ("redo " + ", ".join(stale) + "; trained branches are kept") if stale is not None \
                        else "overwrite it"
                    raise PaftError(f"{self.root}: holds a run with a different config (differs at "
                                    f"{', '.join(diff[:5])}); pass --force to {what}, or choose another --out")
                keep = self._kept()
                for name in (list(self.root.iterdir()) if stale is None else (self.root / n for n in stale)):
                    _remove_outputs(name, keep)
            elif self.cfg.run.force:
                keep = self._kept()
                for name in list(self.root.iterdir()):
                    _remove_outputs(name, keep)
        elif self.root.exists():
            keep = self._kept()
            other = [p.name for p in sorted(self.root.iterdir())
                     if not any(k.is_relative_to(p.resolve()) for k in keep)]
            if other:  # a folder holding only this config's inputs is fine to run in
                raise PaftError(f"{self.root}: exists and is not a paft run folder (no config.yaml; holds "
                                f"{other[0]}); --force only overwrites paft runs: choose another --out, or empty "
                                "the folder yourself")
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cfg_path, self.cfg.to_yaml())

    @property
    def device(self) -> str:
        return resolve_device(self.cfg.run.device)

    @cached_property
    def model_dir(self) -> Path:
        return resolve_model_dir(self.cfg.model.name, self.cfg.model.revision, progress=self.ui.log)

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.model_dir, self.cfg.model.trust_remote_code)

    def _timed(self, stage: str, start: float) -> None:
        state_path = self.root / "timings.json"
        state = read_json(state_path, "delete it (it holds only stage times)") if state_path.exists() else {}
        state[stage] = round(time.perf_counter() - start, 2)
        write_json_atomic(state_path, state)

    def _once(self, path: Path, compute: Callable[[], dict[str, Any]], stage: str | None = None,
              redo: str = "delete it and run the same command again to redo that stage") -> dict[str, Any]:
        """A stage's saved JSON when it exists (damaged: one line with ``redo``); else compute it, write it
        atomically and record its time."""
        if path.exists():
            return read_json(path, redo)
        start = time.perf_counter()
        out = compute()
        write_json_atomic(path, out)
        if stage:
            self._timed(stage, start)
        return out

    # ------------------------------------------------------------------ data
    def data(self) -> dict[str, Any]:
        """Load, validate and split both datasets into canonical JSONL under data/ (once)."""
        # listwise methods (data kind "ranked") get graded reply lists for the same prompts
        ranked = get_loss(self.cfg.preference.method).data == "ranked"
        summary_path = self.data_dir / "summary.json"
        if summary_path.exists() and not self._sources_checked:  # never reuse data prepared from an older file
            check_sources_unchanged(self.cfg.data, read_json(summary_path, REDO_DATA), self.root)
            self._sources_checked = True
        return self._once(summary_path, lambda: prepare_data(
            self.cfg.data, self.data_dir, seed=self.cfg.run.seed, ranked=ranked, log=self.ui.log), "data", REDO_DATA)

    def eval_examples(self, kind: str) -> list:
        return load_examples(str(self.data_dir / f"{kind}_eval.jsonl"), kind).examples

    # ------------------------------------------------------------------ training
    def train(self, names: list[str]) -> dict[str, Any]:
        """Train the named branches ("sft", "preference", "sequential", trained remedies), in parallel where allowed."""
        todo = [n for n in names if not branch_done(self.branch_dir(n))]
        for name in todo:
            after = self.branches[name][1]
            if after and after not in names and not branch_done(self.branch_dir(after)):
                raise PaftError(f"branch {name!r} starts from {after!r}, which has not been trained")
        self.data()
        preference = any(self.branches[n][0] == "preference" for n in todo)
        if preference:
            # data the preference method cannot use fails now, not after the SFT branch has trained
            preference_examples(self.cfg, self.data_dir / "preference_train.jsonl",
                                source=self.cfg.data.preference.path)
        _ = self.model_dir  # resolve (and convert) the base once, before any child starts
        if preference and self.needs_reward_model():
            self.reward()  # the online method's scorer: a reward model trained on the run's preference pairs
        start = time.perf_counter()
        if todo:
            if self.cfg.run.backend == "ray":
                self._train_ray(todo)
            elif self.cfg.run.parallel and len(todo) > 1:
                self._train_parallel(todo)
            else:
                for name in todo:
                    run_branch(**self._branch_args(name), threads=self.cfg.run.threads, device=self.device,
                               gpus=self._gpus(), report=self.ui.branch_report)
            self._timed("train:" + "+".join(todo), start)
        return {n: read_summary(self.branch_dir(n)) for n in names}

    def needs_reward_model(self) -> bool:
        """An online method scored by a reward model that the config does not name: the run trains one."""
        p = self.cfg.preference
        scorer = p.online.scorer
        return get_loss(p.method).schedule.scorer_kind(scorer.kind) == "reward_model" and scorer.path is None

    def reward(self) -> dict[str, Any]:
        """Train the Bradley-Terry reward model (``reward`` section) on the preference pairs into RUN/reward/ (once).

        Trains on data/preference_train.jsonl and measures pairwise accuracy on
        data/preference_eval.jsonl (RUN/reward/reward_eval.json); a finished one is reused.
        """
        out = self.branch_dir("reward")
        if branch_done(out):
            return read_summary(out)
        self.data()
        reward_pairs(self.data_dir / "preference_train.jsonl")  # unpaired data fails before the base is resolved
        _ = self.model_dir
        start = time.perf_counter()
        summary = train_reward(self.cfg, self.model_dir, self.data_dir / "preference_train.jsonl", out,
                               eval_path=self.data_dir / "preference_eval.jsonl", device=self.device,
                               threads=self.cfg.run.threads, report=self.ui.branch_report)
        self._timed("reward", start)
        return summary

    def _branch_args(self, name: str) -> dict[str, Any]:
        kind, after = self.branches[name]
        return {"kind": kind, "cfg": self.cfg, "model_dir": self.model_dir,
                "data_path": self.data_dir / f"{kind}_train.jsonl", "out_dir": self.branch_dir(name),
                "init_adapter": self.output(after) if after else None, "name": name,
                "reward_dir": self.root / "reward" if self.needs_reward_model() else None,
                "remedy": name if name not in BRANCHES else None}

    def _train_parallel(self, names: list[str]) -> None:
        """Two worker processes from the same base, each with half the CPU threads (or its own GPU); a branch
        that ends hands its threads to the one still running, its process to the next (sequential after SFT)."""
        gpus = self._gpus()
        with WorkerPool(2, self.cfg.run.threads or torch.get_num_threads(), gpus if len(gpus) >= 2 else [],
                        fresh=False) as pool:
            queue = pool.manager.Queue()  # progress messages from the workers

            def place(name):  # arguments taken when the branch starts: the sequential one's start is SFT's output
                # a slot's GPUs (CUDA_VISIBLE_DEVICES of a branch group): the sequential branch takes SFT's slot
                return lambda slot: {**self._branch_args(name), "threads": slot.threads, "report": queue.put,
                                     "device": f"cuda:{gpus.index(slot.gpus[0])}" if slot.gpus else self.device,
                                     "gpus": slot.gpus, "thread_share": (pool.threads, pool.active)}

            with self.ui.queue_listener(queue):
                pool.run([Job(n, run_branch, place=place(n), after=self.branches[n][1]) for n in names])

    def _train_ray(self, names: list[str]) -> None:
        """Each branch a Ray task holding its processes' CPUs (and GPUs, one per process, on one node), which
        trains it as ``run_branch`` does here; concurrent as ``run.parallel`` allows, the sequential branch after
        SFT. The run folder must be on storage every node sees; merge and evaluation run here."""
        with RayPool(self.cfg.run.ray_address, "run.backend") as pool:
            cuda = self.cfg.run.device != "cpu" and pool.ray.cluster_resources().get("GPU", 0) > 0
            queue = pool.queue()

            def place(name):
                return lambda slot: {**self._branch_args(name), "threads": slot.threads, "report": queue.put,
                                     "device": self.cfg.run.device if cuda else "cpu"}

            def resources(job):
                n = self.cfg.run.processes_for(job.name)
                return float(n), float(n if cuda else 0)

            jobs = [Job(n, run_branch, place=place(n),
                        after=self.branches[n][1] if self.cfg.run.parallel or i == 0 else names[i - 1])
                    for i, n in enumerate(names)]
            with self.ui.queue_listener(queue):
                pool.run(jobs, resources)

    def _gpus(self) -> list[str]:
        return visible_gpus() if self.device.startswith("cuda") else []

    # ------------------------------------------------------------------ analysis and merge
    def sparsity(self) -> dict[str, Any]:
        return self._once(self.root / "sparsity.json", self._compute_sparsity, "sparsity")

    def _compute_sparsity(self) -> dict[str, Any]:
        s = self.cfg.sparsity
        # the trained remedies' deltas too: no_l1's is the plain SFT delta PAFT's sparsity claim is measured against
        # (the sequential adapter is a delta on the SFT model, not on the base: left out)
        names = ["sft", "preference", *(n for n in self.branches if n not in BRANCHES)]
        out = {name: model_sparsity(self.output(name), self.model_dir, s.absolute, s.relative)
               for name in names if self.output(name).exists()}
        if not out:
            raise PaftError(f"{self.root}: no trained branch adapters to analyse; run `paft sft`/`paft align` first")
        return out

    def merge(self) -> dict[str, Any]:
        summary_path = self.merged_dir / "paft_merge.json"
        if summary_path.exists():
            return read_json(summary_path, f"delete {self.merged_dir} and run the same command again to redo the merge")
        for name in ("sft", "preference"):
            if not self._has_output(name):
                raise PaftError(f"{self.output(name)}: missing; train the {name} branch before merging")
        m = self.cfg.merge
        start = time.perf_counter()
        # a full fine-tuned branch's delta is W - W_base; a QLoRA adapter applies to the float base
        plan = plan_from_flags(self.model_dir, [self.output("sft"), self.output("preference")], m.method,
                               weights=m.weights, density=m.density, params=m.params, seed=m.seed, source="merge")
        summary = run_merge(plan, self.merged_dir, force=True, progress=lambda d, t: self.ui.update("merge", d, t))
        self._timed("merge", start)
        return summary

    def sequential_model(self) -> Path:
        """The sequential baseline as a full model: base + SFT delta + preference delta trained on top."""
        # a full fine-tuned sequential branch wrote this folder itself (it started from the SFT weights)
        if not is_model(self.sequential_model_dir):
            # the sequential adapter records the SFT model (full SFT) as its base: adding it to base + SFT is the point
            run_merge(plan_from_flags(self.model_dir, [self.output("sft"), self.adapter("sequential")],
                                      "task_arithmetic", source="sequential", allow_base_mismatch=True),
                      self.sequential_model_dir, force=True)
        return self.sequential_model_dir

    # ------------------------------------------------------------------ evaluation and report
    def model_specs(self) -> list:
        specs = [ModelSpec("base", self.model_dir)]
        for name in ("sft", "preference"):
            if self._is_full(name):
                specs.append(ModelSpec(name, self.output(name)))
            elif self.adapter(name).exists():
                specs.append(ModelSpec(name, self.model_dir, self.adapter(name)))
        if self.adapter("sequential").exists() or self._is_full("sequential"):
            specs.append(ModelSpec("sequential", self.sequential_model()))
        if is_model(self.merged_dir):
            specs.append(ModelSpec("paft", self.merged_dir))
        return specs

    def evaluate(self) -> dict[str, Any]:
        return self._once(self.root / "eval.json", self._compute_eval, "eval")

    def _compute_eval(self) -> dict[str, Any]:
        self.data()
        specs = self.model_specs()

        def progress(name, i, n):
            self.ui.update("evaluate", i, n, name)

        res = evaluate_models(specs, self.cfg, self.tokenizer, self.eval_examples("sft"),
                              self.eval_examples("preference"), device=self.device, base_dir=self.model_dir,
                              progress=progress)
        self.ui.update("evaluate", len(specs), len(specs), "done")
        return res

    # ------------------------------------------------------------------ training-free candidates
    def candidate_specs(self) -> tuple[list[tuple[dict[str, Any], ModelSpec]], dict[str, str]]:
        """Each configured candidate (``paft.methods.candidates``) the trained branches allow, as its record and a
        ModelSpec merging it in memory; and the families skipped, with why."""
        c, m = self.cfg.candidates, self.cfg.merge
        found: list[tuple[dict[str, Any], ModelSpec]] = []
        skipped: dict[str, str] = {}
        for family in CANDIDATES.values():
            values = settings(family, c)
            missing = [b for b in family.needs if not self._has_output(b)]
            if values and missing:
                why = "; run.sequential_baseline is false" if "sequential" in missing and \
                    not self.cfg.run.sequential_baseline else ""
                skipped[family.name] = f"needs the {', '.join(missing)} branch, not trained{why}"
                continue
            for value in values:
                recipe, name = family.recipe(value), candidate_name(family, value)
                if recipe.method == m.method:
                    continue  # the run's own merge: the paft model
                plan = self.recipe_plan(recipe, f"candidates.{family.key}: {name}")
                PreparedMerge(plan).job()  # every tensor's merge arguments checked now, before any evaluation
                record = {"name": name, "family": family.name, "setting": value, "what": family.what,
                          "weights": list(recipe.weights) if recipe.weights is not None else None}
                found.append((record, ModelSpec(name, self.model_dir, plan=plan)))
        for r in (REMEDIES[n] for n in c.trained.names):  # trained remedies: their branch's model, or its PAFT merge
            missing = [b for b in (r.merge or (r.branch,)) if not self._has_output(b)]
            if missing:
                skipped[r.name] = f"needs the {', '.join(missing)} branch, not trained"
                continue
            if r.merge:
                plan = plan_from_flags(self.model_dir, [self.output(b) for b in r.merge], m.method, weights=m.weights,
                                       density=m.density, params=m.params, seed=m.seed,
                                       source=f"candidates.trained: {r.name}")
                PreparedMerge(plan).job()
                spec = ModelSpec(r.model, self.model_dir, plan=plan)
            else:
                spec = self._branch_spec(r.model, r.branch)
            found.append(({"name": r.model, "family": r.name, "setting": None, "what": r.what, "weights": None}, spec))
            if r.alone:  # the remedy's branch on its own (no_l1: the SFT branch without L1, beside the L1 one)
                found.append(({"name": r.alone, "family": r.name, "setting": None, "what": r.what, "weights": None,
                               "needs": (r.branch,)}, self._branch_spec(r.alone, r.branch)))
        return found, skipped

    def _branch_spec(self, model: str, branch: str) -> ModelSpec:
        """A trained branch's own model: its full folder, or its adapter on the base."""
        if self._is_full(branch):
            return ModelSpec(model, self.output(branch))
        return ModelSpec(model, self.model_dir, self.adapter(branch))

    def recipe_plan(self, recipe: Recipe, source: str, weights: list[float] | None = None,
                    density: float | None = None):
        """The merge plan of a candidate recipe (``paft.methods.candidates``): its weights over ``(theta_sft - base,
        theta_seq - base)`` as a task-arithmetic merge of the branch outputs, or its method on the SFT and preference
        deltas with ``weights`` and ``density`` (default: the ``merge`` section's)."""
        m = self.cfg.merge
        if recipe.weights is not None:
            w = branch_weights(recipe.weights, self._is_full("sequential"))
            # the sequential adapter records the SFT model as its base (see sequential_model)
            return plan_from_flags(self.model_dir, [self.output("sft"), self.output("sequential")], "task_arithmetic",
                                   weights=list(w), allow_base_mismatch=True, source=source)
        return plan_from_flags(self.model_dir, [self.output("sft"), self.output("preference")], recipe.method,
                               weights=list(weights or m.weights), density=m.density if density is None else density,
                               params=method_params(recipe.method, m.params), seed=m.seed, source=source)

    def candidates(self) -> dict[str, Any] | None:
        """Score the training-free candidates into candidates.json (once); None when none are configured."""
        c = self.cfg.candidates
        if not c.enabled or not (any(settings(f, c) for f in CANDIDATES.values()) or c.trained.names):
            return None
        if not self.cfg.eval.heldout:
            self.ui.log("candidates: skipped; they are scored on the held-out metrics and eval.heldout is false")
            return None
        return self._once(self.root / "candidates.json", self._compute_candidates, "candidates")

    def _compute_candidates(self) -> dict[str, Any]:
        self.data()
        ev = self.evaluate()
        found, skipped = self.candidate_specs()
        # held-out metrics only: the harness, reward model, judge and harmlessness replies take minutes per model
        e = self.cfg.eval.model_copy(update={"harness_tasks": [], "reward_model": None, "judge_model": None,
                                             "harmlessness": False})
        cfg = self.cfg.model_copy(update={"eval": e})
        # the base first: the implicit-reward reference, as in eval.json
        specs = [ModelSpec("base", self.model_dir)] + [spec for _, spec in found]

        def progress(name, i, n):
            self.ui.update("candidates", i, n, name)

        # the base's own metrics are eval.json's: here it gives only the implicit rewards' reference log-probs
        res = evaluate_models(specs, cfg, self.tokenizer, self.eval_examples("sft"), self.eval_examples("preference"),
                              device=self.device, reference="base", base_dir=self.model_dir, progress=progress,
                              score_reference=False)
        self.ui.update("candidates", len(specs), len(specs), "done")
        first = next(iter(res["models"].values()), None)
        keys = [k for k in first if k != "eval_s" and not k.endswith("_stderr")] if first else list(HELDOUT_METRICS)
        branches = {b: {"steps": s.get("steps"), "wall_s": s.get("wall_s")}
                    for b in self.branches if (s := self._summary(b)) is not None}
        merge_s = (read_json(self.root / "timings.json", "delete it") if (self.root / "timings.json").exists()
                   else {}).get("merge")

        def cost(needs, extra_s):
            parts = [branches.get(b, {}) for b in needs]
            steps = [p.get("steps") for p in parts]
            wall = [p.get("wall_s") for p in parts]
            return {"branches": list(needs), "train_steps": sum(steps) if None not in steps else None,
                    "train_s": round(sum(wall), 2) if None not in wall else None, "extra_s": extra_s}

        rows = [{"name": name, "family": "main", "setting": None, "what": what,
                 "metrics": {k: ev["models"][name].get(k) for k in keys},
                 "cost": cost(needs, (merge_s if name == "paft" else 0.0))}
                for name, (what, needs) in MAIN_MODELS.items() if name in ev.get("models", {})]
        for record, spec in found:
            row = res["models"][spec.name]
            needs = record.pop("needs", None) or _needs(record["family"])  # a row may name its own branches
            rows.append({**record, "metrics": {k: row.get(k) for k in keys}, "cost": cost(needs, row["eval_s"])})
        return {"metrics": keys, "reference": res["reference"], "beta": res["beta"], "n_sft_eval": res["n_sft_eval"],
                "n_pref_eval": res["n_pref_eval"], "branches": branches, "models": rows, "skipped": skipped,
                "note": "held-out metrics only (eval.heldout): the harness, reward model, judge and harmlessness are "
                        "not run for candidates; main models' metrics are eval.json's"}

    # ------------------------------------------------------------------ merge tuning
    @property
    def tune_dir(self) -> Path:
        return self.root / "tune"

    def tune(self) -> dict[str, Any]:
        """Tune the merge on the dev split (``tune`` section, paft.eval.tune), write the picked model to
        RUN/tune/model and its held-out (test) metrics to RUN/tune/eval.json; resumes a killed or extended study."""
        t, out = self.cfg.tune, self.tune_dir
        if t.trials <= 0:
            raise ConfigError("tune.trials: 0 trials; give the number of candidates to score (--trials N)")
        eval_path = out / "eval.json"
        if eval_path.exists():
            done = read_json(eval_path, f"delete {out} and run the same command again to redo the tune")
            if done.get("pick", {}).get("trials", 0) >= t.trials:
                return done
        for name in ("sft", "preference", *(["sequential"] if set(t.methods) & {"expo", "average"} else [])):
            if not self._has_output(name):
                raise PaftError(f"{self.output(name)}: missing; tune.methods {', '.join(t.methods)} merge the {name} "
                                "branch: train it first (paft run), or drop expo/average from tune.methods")
        self.data()
        dev = {}
        for kind in ("sft", "preference"):
            path = self.data_dir / f"{kind}_dev.jsonl"
            if not path.is_file():
                raise PaftError(f"{path}: missing; this run's data stage predates the dev split (data.dev_size): redo "
                                "the run with --force to carve one")
            dev[kind] = load_examples(str(path), kind).examples if path.stat().st_size > 1 else []
        start = time.perf_counter()
        result = self._compute_tune(dev)
        self._timed("tune", start)
        return result

    def _tune_plan(self, params: dict[str, Any], source: str):
        tm = trial_merge(params)
        return self.recipe_plan(tm.recipe, source, weights=tm.weights, density=tm.density)

    def _compute_tune(self, dev: dict[str, list]) -> dict[str, Any]:
        t, out = self.cfg.tune, self.tune_dir
        out.mkdir(parents=True, exist_ok=True)
        scorer = DevScorer(self.cfg, self.tokenizer, dev["sft"], dev["preference"])
        live = LiveMerge(load_model(self.model_dir, self.cfg.model.dtype, self.device,
                                    self.cfg.model.trust_remote_code).eval(), self.model_dir)
        began = time.perf_counter()
        # the dev metrics of the base (the implicit-reward reference) and of each branch: the rule's anchors
        references = {"base": scorer.set_reference(live.model)}
        for name in ("sft", "preference"):
            plan = plan_from_flags(self.model_dir, [self.output(name)], "task_arithmetic", weights=[1.0],
                                   source=f"tune: the {name} branch")
            references[name] = scorer(live.apply(plan))

        def score(params):
            return scorer(live.apply(self._tune_plan(params, f"tune trial {params}")))

        trials = run_study(out / "study.journal", t, score, first=default_trial(self.cfg),
                           progress=lambda i, n, note: self.ui.update("tune", i, n, note))
        del live, scorer, score  # the live model's memory, before the picked model is written and evaluated
        scored = [tr for tr in trials if tr.state.name == "COMPLETE"]
        if not scored:
            errors = [tr.user_attrs.get("error") for tr in trials if tr.user_attrs.get("error")]
            raise PaftError(f"tune: none of {len(trials)} trials was scored" + (f" (first: {errors[0]})" if errors
                                                                                 else "") + "; check the tune section")
        points = [tr.user_attrs["metrics"] for tr in scored]
        front = {scored[i].number for i in pareto_front(points, t.objectives)}
        pick = pick_point(t.pick, points, t.objectives, references["sft"])
        best = scored[pick.index]
        tune_s = round(time.perf_counter() - began, 2)
        record = {"rule": t.pick, "trial": best.number, "params": best.params, "dev_metrics": points[pick.index],
                  "note": pick.note, "trials": len(trials)}
        write_json_atomic(out / "trials.json", {
            "objectives": t.objectives, "directions": {k: "max" if higher_is_better(k) else "min" for k in t.objectives},
            "sampler": t.sampler, "n_dev": {k: len(v) for k, v in dev.items()}, "references": references,
            "pick": record, "search_s": tune_s, "trials": trial_rows(trials, front)})
        # the picked point as a model folder, then its held-out (test) metrics: the test split is read only here
        start = time.perf_counter()
        merge = run_merge(self._tune_plan(best.params, f"tune: picked trial {best.number}"), out / "model", force=True)
        e = self.cfg.eval.model_copy(update={"harness_tasks": [], "reward_model": None, "judge_model": None,
                                             "harmlessness": False})
        res = evaluate_models([ModelSpec("base", self.model_dir), ModelSpec("paft_tuned", out / "model")],
                              self.cfg.model_copy(update={"eval": e}), self.tokenizer, self.eval_examples("sft"),
                              self.eval_examples("preference"), device=self.device, reference="base",
                              base_dir=self.model_dir, score_reference=False)  # the base's metrics: eval.json
        needs = trial_merge(best.params).needs
        steps = [(self._summary(b) or {}).get("steps") for b in needs]
        wall = [(self._summary(b) or {}).get("wall_s") for b in needs]
        res.update(models={"paft_tuned": res["models"]["paft_tuned"]},
                   samples={"paft_tuned": res["samples"].get("paft_tuned", [])}, pick=record,
                   merge={k: merge.get(k) for k in ("method", "tensors_merged") if k in merge},
                   cost={"branches": list(needs), "train_steps": sum(steps) if None not in steps else None,
                         "train_s": round(sum(wall), 2) if None not in wall else None,
                         "extra_s": round(tune_s + time.perf_counter() - start, 2), "trials": len(trials)},
                   note="held-out (test) metrics of the picked point only; the search saw the dev split")
        write_json_atomic(out / "eval.json", res)
        return res

    def _summary(self, name: str) -> dict[str, Any] | None:
        return read_summary(self.branch_dir(name)) if (self.branch_dir(name) / "train_summary.json").is_file() \
            else None

    def provenance(self) -> dict[str, Any]:
        return self._once(self.root / "provenance.json", self._compute_provenance)

    def _compute_provenance(self) -> dict[str, Any]:
        data = self.data()
        weights = sorted(self.model_dir.glob("*.safetensors"))
        return {
            "versions": package_versions(),
            "seeds": {"run": self.cfg.run.seed, "demo": self.cfg.data.demo.seed, "merge": self.cfg.merge.seed},
            "model": {"name": self.cfg.model.name, "dir": str(self.model_dir),
                      "sha256": {w.name: sha256_file(w) for w in weights}},
            "inputs": {k: {kk: v.get(kk) for kk in ("path", "sha256", "eval_sha256") if v.get(kk)}
                       for k, v in data.items()},
            "device": self.device, "cpu_count": os.cpu_count(),
        }

    def report(self) -> Path:
        return write_report(self.root, self.cfg)

    def all(self) -> Path:
        """The whole PAFT run."""
        self.prepare()
        self.data()
        self.provenance()
        names = ["sft", "preference"] + (["sequential"] if self.cfg.run.sequential_baseline else [])
        names += [n for n in self.branches if n not in BRANCHES]  # trained remedies: one more branch each
        self.train(names)
        self.sparsity()
        self.merge()
        self.evaluate()
        self.candidates()
        if self.cfg.tune.trials > 0:
            self.tune()
        return self.report()


def _needs(family: str) -> tuple[str, ...]:
    """The trained branches a candidate family (or trained remedy) reuses: its cost."""
    return CANDIDATES[family].needs if family in CANDIDATES else REMEDIES[family].needs


# outputs made stale by a change in a config section that only later stages read
_DOWNSTREAM = {"merge": ["merged", "eval.json", "candidates.json", "tune"],
               "eval": ["eval.json", "candidates.json", "tune"], "candidates": ["candidates.json", "sparsity.json"],
               "tune": ["tune"], "sparsity": ["sparsity.json"]}
# keys whose change keeps every output: more tune trials extend the study in RUN/tune
RESUMABLE_KEYS = {"tune.trials", "tune.timeout_s"}


def _stale_outputs(sections: set[str]) -> list[str] | None:
    """Outputs to redo when only downstream sections changed; None when training inputs changed."""
    if not sections <= set(_DOWNSTREAM):
        return None
    return sorted({name for s in sections for name in _DOWNSTREAM[s]})


def _input_paths(cfg: PaftConfig, root: Path) -> set[Path]:
    """Existing files and folders the config names (data files, local models) that lie inside ``root``."""
    found: set[Path] = set()

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v and len(v) < 4096:
            p = Path(v.split(":", 1)[1] if ":" in v and not Path(v).exists() else v).expanduser()
            try:
                p = p.resolve()
                if p.exists() and p.is_relative_to(root.resolve()):
                    found.add(p)
            except (OSError, ValueError):
                pass
    walk(cfg.model_dump())
    return found


def _remove_outputs(target: Path, keep: set[Path]) -> None:
    """Remove ``target`` (a file or folder of a run's outputs), sparing the input paths in ``keep``."""
    resolved = target.resolve()
    if resolved in keep or not (target.exists() or target.is_symlink()):
        return
    if target.is_dir() and not target.is_symlink():
        if any(k.is_relative_to(resolved) for k in keep):
            for child in list(target.iterdir()):
                _remove_outputs(child, keep)
            return
        shutil.rmtree(target)
    else:
        target.unlink()


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}
