"""Run configuration: one YAML file, validated by pydantic, with errors that name the key.

Sections: ``model``, ``data``, ``sft``, ``preference``, ``reward``, ``merge``, ``sparsity``, ``eval``, ``candidates``,
``tune``, ``run``.
Every CLI flag maps to a key here (``--set section.key=value`` reaches any of them).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from paft.data.loading import dataset_preset
from paft.errors import ConfigError, DataError
from paft.methods.merging import MERGE_METHODS
from paft.methods.objectives import LOGLIK_METRICS, METRICS, harness_objective, parse_pick
from paft.methods.remedies import REMEDIES

PRESETS = ("default", "tiny")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name: str = Field("smollm2-135m", description="HF folder, hub id, or alias: smollm2-135m, tiny")
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the base weights (training precision is run.bf16)")


class DataSource(_Section):
    """One dataset: ``demo`` (built-in), a local file (jsonl/json/parquet/csv) or a `datasets` name."""

    path: str = "demo"
    format: str = Field("auto", description="auto, or a format adapter name (see paft.data.formats)")
    split: str = "train"
    subset: str | None = None
    eval_path: str | None = Field(None, description="held-out file; default: split off eval_size rows")
    eval_split: str | None = None
    eval_size: float = Field(0.1, gt=0, lt=1, description="share of rows held out when eval_path is unset")
    max_rows: int | None = Field(None, gt=0)
    beavertails_preference: Literal["helpful", "safe"] = Field(
        "helpful", description="BeaverTails: better_response_id (helpful) or safer_response_id (safe)")
    local: str | None = Field(None, description="a local file in a dataset preset's schema (path: hh-rlhf:..., "
                                                "beavertails:...), read instead of the hub")

    @field_validator("path", "eval_path")
    @classmethod
    def _preset_known(cls, v: str | None) -> str | None:
        try:
            if v is not None:
                dataset_preset(v)  # a known preset name with an unknown selector fails here, naming the key
        except DataError as e:
            raise ValueError(str(e)) from None
        return v

    @field_validator("format")
    @classmethod
    def _format_name(cls, v: str) -> str:
        return v.strip().lower().replace("-", "_")  # `hh-rlhf` as the preset is spelt


class DemoConfig(_Section):
    seed: int = 0
    sft_train: int = Field(512, gt=0)
    sft_eval: int = Field(64, gt=0)
    preference_train: int = Field(256, gt=0)
    preference_eval: int = Field(64, gt=0)


class DataConfig(_Section):
    sft: DataSource = DataSource()
    preference: DataSource = DataSource()
    demo: DemoConfig = DemoConfig()
    max_length: int = Field(256, gt=8, description="tokens of prompt + completion; longer rows are truncated")
    max_prompt_length: int = Field(192, gt=0)
    skip_invalid: bool = Field(False, description="skip malformed rows (and report the count) instead of stopping")
    dev_size: int = Field(32, ge=0, description="rows per dataset carved from the training rows into a dev split "
                                                "({kind}_dev.jsonl; `paft tune` scores on it), no prompt shared with "
                                                "the training or held-out rows; 0: none")

    @model_validator(mode="after")
    def _prompt_fits(self) -> "DataConfig":
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})")
        return self


class LoraConfig(_Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


# transformers' SchedulerType values the Trainer builds from TrainingArguments alone (no lr_scheduler_kwargs, no
# evaluation metric); kept here, since importing transformers to read them would cost `paft config` seconds, and
# checked against transformers by tests/test_bad_input.py
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class TrainConfig(_Section):
    """Knobs shared by both branches (passed to transformers' TrainingArguments)."""

    adapter: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora; qlora (LoRA on the base loaded in 4-bit NF4, needs bitsandbytes: paft[qlora]); "
                            "full (full fine-tuning, no adapter: writes RUN/BRANCH/model)")
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(2e-4, gt=0)
    max_steps: int = Field(60, description="optimizer steps; -1 to use epochs")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, gt=0, description="rows per optimizer step, over all processes and accumulation "
                                                 "steps (each process's micro-batch: batch_size / run.processes / "
                                                 "grad_accum)")
    grad_accum: int = Field(1, gt=0, description="micro-batches accumulated per optimizer step")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: str = Field("cosine", description=", ".join(LR_SCHEDULERS))
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(5, gt=0)
    save_steps: int = Field(20, gt=0, description="checkpoint interval; a killed run resumes from the last one")
    packing: bool = Field(
        True, description="packed batches: several sequences per row with a block attention mask and restarting "
                          "positions, and a prompt shared by chosen/rejected (or ranked) replies computed once; "
                          "same loss and gradients as the padded layout (KTO-style unpaired data stays padded)")
    pack_length: int = Field(4096, gt=8, description="tokens per packed row (a longer example gets a row of its own)")
    completion_logits: bool = Field(
        True, description="LM head and log-softmax only where a completion token is predicted (off: full-vocabulary "
                          "logits at every position, the plain path; same numbers, slower)")

    @field_validator("lr_scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        if v not in LR_SCHEDULERS:
            hint = difflib.get_close_matches(v, LR_SCHEDULERS, n=1)
            raise ValueError(f"unknown scheduler {v!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + f"; known: {', '.join(LR_SCHEDULERS)}")
        return v

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be a positive number of steps, or -1 to train for `epochs`")
        return v


class SFTConfig(TrainConfig):
    l1_lambda: float = Field(
        1e-5, ge=0, description="PAFT sparsity penalty lambda * ||B A scale||_1 on the SFT delta (0 = plain SFT)")


class ScorerConfig(_Section):
    """What scores sampled replies in online methods (and serves as a reward in evaluation).

    ``reward_model``: a ``paft reward`` output folder (``path``; unset: the run trains one on
    its preference data first). ``judge``: an LLM-as-judge prompt on a causal LM (``path``;
    unset: the policy being trained judges itself, as in self-rewarding). ``function``: a
    Python callable ``f(prompts, responses) -> list[float]`` named ``module:function`` or
    ``file.py:function``.
    """

    kind: Literal["reward_model", "judge", "function"] = "reward_model"
    path: str | None = Field(None, description="reward_model: a `paft reward` output folder; judge: a model")
    function: str | None = Field(None, description="function scorer: module:function or path/to/file.py:function")
    judge_template: str | None = Field(None, description="judge prompt with {prompt} and {response}; "
                                                         "default: a 1-5 rating prompt")
    batch_size: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _function_named(self) -> "ScorerConfig":
        if self.kind == "function" and not self.function:
            raise ValueError("kind 'function' needs `function: module:function`")
        return self


class OnlineConfig(_Section):
    """Online / iterative preference training: rounds of sample -> score -> pair -> train."""

    rounds: int = Field(2, gt=0)
    prompts_per_round: int = Field(32, gt=0)
    samples_per_prompt: int = Field(4, ge=2, description="replies sampled per prompt; best vs worst form a pair")
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    reference: Literal["initial", "previous"] = Field(
        "initial", description="DPO reference of each round: the starting model, or the previous round's policy")
    scorer: ScorerConfig = ScorerConfig()


class RewardConfig(TrainConfig):
    """``paft reward``: a Bradley-Terry reward model (sequence-classification head + LoRA) on preference pairs."""

    # the reward trainer (paft.train.reward) builds its own LoRA model; qlora/full are not wired there yet
    adapter: Literal["lora"] = Field("lora", description="lora only, for now")
    learning_rate: float = Field(1e-4, gt=0)
    margin_weight: float = Field(0.0, ge=0, description="add Llama-2's margin term (0 = plain Bradley-Terry)")
    center_rewards: float = Field(0.0, ge=0, description="weight of the (r_w + r_l)^2 centering term")


class PreferenceConfig(TrainConfig):
    method: str = Field("dpo", description="preference loss by name (paft.methods.losses registry)")
    beta: float = Field(0.1, gt=0)
    params: dict[str, Any] = Field(default_factory=dict, description="extra hyper-parameters of the method")
    learning_rate: float = Field(5e-5, gt=0)
    reference_cache: bool = Field(
        True, description="cache reference log-probs on disk per (model, data, tokenisation); "
                          "off: the adapter-disabled forward every step")
    online: OnlineConfig = OnlineConfig()

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        from paft.methods.losses import LOSSES  # lazy: torch (2 s), which `paft --help` never needs

        key = v.lower()
        if key not in LOSSES:
            hint = difflib.get_close_matches(key, list(LOSSES), n=1)
            raise ValueError(f"unknown method {v!r}; known: {', '.join(sorted(LOSSES))}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return key

    @model_validator(mode="after")
    def _schedule(self) -> "PreferenceConfig":
        from paft.methods.losses import LOSSES  # lazy: as in _known

        spec = LOSSES[self.method]
        for key in self.params:  # the loss would get it as an unexpected keyword argument at its first step
            if key not in spec.params:
                hint = difflib.get_close_matches(str(key), list(spec.params), n=1)
                raise ValueError(f"preference.params: {self.method} has no parameter {key!r}"
                                 + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                 + (f"; it takes {', '.join(spec.params)}" if spec.params else "; it takes none")
                                 + ("; beta is preference.beta" if key == "beta" else ""))
        try:  # schedule parameters out of range (or of the wrong type) fail here, naming the key
            schedule = spec.configure(self.params)[1]
        except TypeError as exc:
            raise ValueError(f"preference.params: {exc}") from None
        if self.adapter == "full" and schedule.kind != "offline":
            # staged/online phases save and restore a LoRA adapter between phases
            raise ValueError(f"preference.adapter 'full' works with offline methods only; {self.method!r} is "
                             f"{schedule.kind}: use adapter lora or qlora")
        return self


class MergeConfig(_Section):
    method: str = Field("ties", description="a merge method by name (paft.methods.merging.MERGE_METHODS)")
    weights: list[float] = Field(default_factory=lambda: [1.0, 1.0], description="[sft, preference]")
    density: float = Field(0.5, gt=0, le=1, description="share of delta entries kept (ties/dare)")
    seed: int = 0
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="method extras: gamma (breadcrumbs), epsilon, lambda_ (della), t (slerp), "
                                               "normalize, majority_sign (ties)")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {v!r}; known: {', '.join(sorted(MERGE_METHODS))}")
        return v

    @field_validator("weights")
    @classmethod
    def _two(cls, v: list[float]) -> list[float]:
        if len(v) != 2:
            raise ValueError(f"needs two weights [sft, preference], got {len(v)}")
        return v


class SparsityConfig(_Section):
    absolute: list[float] = Field(default_factory=lambda: [1e-6, 1e-5, 1e-4])
    relative: list[float] = Field(
        default_factory=lambda: [1e-3, 1e-2],
        description="entry counts as zero when |delta| <= r * RMS of the base weight of its module")


class EvalConfig(_Section):
    """What ``paft eval`` and the run's eval step measure on every model (paft.eval.models.evaluate_models)."""

    max_examples: int = Field(64, gt=0, description="held-out rows per metric")
    max_new_tokens: int = Field(16, gt=0)
    batch_size: int = Field(16, gt=0)
    beta: float | None = Field(None, gt=0, description="beta of implicit rewards; default preference.beta")
    heldout: bool = Field(True, description="held-out SFT/preference metrics on the run's data (exact match, NLL, "
                                            "preference accuracy, implicit reward)")
    harness_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks run in process: names, NAME:SHOTS, paft_arith (shipped), "
                    "leaderboard-v1 (ARC-25, HellaSwag-10, MMLU-5, TruthfulQA-mc2-0, Winogrande-5, GSM8K-5)")
    harness_limit: float | None = Field(
        None, gt=0, description="rows per harness task (a share of them when below 1); unset: all")
    harness_batch_size: int | None = Field(None, gt=0, description="harness batch size; default eval.batch_size")
    harness_chat_template: bool = Field(
        False, description="render harness prompts with the model's chat template (the Open LLM Leaderboard v1 did not)")
    reward_model: str | None = Field(
        None, description="a `paft reward` output folder: mean reward (rm_reward) of each model's greedy replies")
    judge_model: str | None = Field(
        None, description="a chat model (folder, alias or hub id) judging replies pairwise against judge_reference "
                          "(judge_win_rate) and harmful-prompt replies (refusal/unsafe)")
    judge_reference: str = Field("base", description="the model whose replies the others are compared with "
                                                     "(judge_win_rate, rm_win_rate)")
    reply_max_new_tokens: int | None = Field(
        None, gt=0, description="length of the greedy replies that the reward model, the judge and the refusal "
                                "check read; default max_new_tokens")
    harmlessness: bool = Field(True, description="refusal rate on paft's shipped harmful prompts (and over-refusal "
                                                 "on benign ones): judged when judge_model is set, else a "
                                                 "refusal-phrase heuristic")
    fast: bool = Field(True, description="the fast path (same numbers): held-out rows tokenized once, the prompt of a "
                                         "pair computed once (packed rows), greedy replies in token-budget batches "
                                         "with a KV cache, the reference's log-probs cached on disk, all CPU cores; "
                                         "false: the plain path")

    @field_validator("harness_tasks", mode="before")
    @classmethod
    def _task_syntax(cls, v: Any) -> Any:
        if isinstance(v, str):  # --set eval.harness_tasks=a,b:5 and --tasks a,b give one string
            v = [x for x in v.split(",") if x.strip()]
        if not isinstance(v, list):
            return v
        for item in v:  # existence is checked when the eval starts (it needs lm-eval's task index)
            if not isinstance(item, str) or not re.fullmatch(r"[\w.\-]+(:\d+)?", item.strip()):
                raise ValueError(f"{item!r}: expected a task name or NAME:SHOTS, e.g. arc_challenge:25")
        return [x.strip() for x in v]

    @field_validator("harness_limit")
    @classmethod
    def _limit(cls, v: float | None) -> float | None:
        if v is not None and v >= 1 and not float(v).is_integer():
            raise ValueError("a number of rows (a whole number) or a share of them below 1")
        return v


class TrainedCandidatesConfig(_Section):
    """Trained alignment-tax remedies (paft.methods.remedies, docs/trained-candidates.md): each name trains one more
    branch, whose model is scored into candidates.json beside the training-free candidates."""

    names: list[str] = Field(
        default_factory=list,
        description="remedies to train, each one more branch: joint (preference loss + gamma * NLL on SFT data, from "
                    "the base), online_dare / online_ties (preference training from the SFT model, each optimizer "
                    "step merged with the SFT delta), no_l1 (the SFT branch without L1, PAFT-merged); [] adds none")
    joint_gamma: float = Field(1.0, gt=0, description="joint: weight gamma of the NLL term on the SFT batch")
    online_density: float = Field(0.5, gt=0, le=1, description="online_dare: keep rate p of each step's update "
                                                                "(kept entries rescaled by 1/p); online_ties: share "
                                                                "of each step's update (and of the SFT delta) kept "
                                                                "by magnitude")
    online_tau_weight: float = Field(
        1e-4, ge=0, lt=1, description="online_dare / online_ties: weight alpha of the SFT delta added at every step "
                                      "(the step's own update gets 1 - alpha); the paper's alpha, small since it is "
                                      "added once per step")

    @field_validator("names", mode="before")
    @classmethod
    def _one_name(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # --set candidates.trained.names=joint

    @field_validator("names")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in REMEDIES:
                hint = difflib.get_close_matches(name, list(REMEDIES), n=1)
                raise ValueError(f"unknown trained candidate {name!r}"
                                 + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; known: {', '.join(REMEDIES)}")
        return _distinct(v)


class CandidatesConfig(_Section):
    """Training-free alignment-tax candidates scored after the evaluation (paft.methods.candidates, docs/candidates.md):
    merges of branches the run trained anyway, evaluated on the held-out metrics (``eval.heldout``) only."""

    enabled: bool = Field(True, description="score the candidates (RUN/candidates.json); false, or every list "
                                            "empty: the stage is skipped")
    expo_alpha: list[float] = Field(
        default_factory=lambda: [0.5],
        description="ExPO: theta_seq + alpha (theta_seq - theta_sft), one candidate per alpha in [0, 10] (below 0 "
                    "it is an average: average_alpha)")
    average_alpha: list[float] = Field(
        default_factory=lambda: [0.5],
        description="weight averaging: (1 - alpha) theta_sft + alpha theta_seq, one candidate per alpha in [0, 1]")
    average_blocks: list[list[float]] = Field(
        default_factory=lambda: [[0.0, 1.0]],
        description="per-block averaging: alpha anchors (>= 2, each in [0, 1]) interpolated from the bottom layer to "
                    "the top; [0, 1]: SFT weights at the bottom, sequential at the top")
    merge_methods: list[str] = Field(
        default_factory=lambda: ["ties", "dare_ties", "task_arithmetic", "linear"],
        description="merge methods applied to the PAFT deltas with the merge section's weights, density and params "
                    "(merge.method itself is the run's paft model and is skipped)")
    trained: TrainedCandidatesConfig = Field(default_factory=TrainedCandidatesConfig,
                                             description="trained remedies: one more branch each")

    @field_validator("expo_alpha", "average_alpha", "merge_methods", mode="before")
    @classmethod
    def _one_value(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float, str)) and not isinstance(v, bool) else v  # --set ...=0.3

    @field_validator("average_blocks", mode="before")
    @classmethod
    def _one_gradient(cls, v: Any) -> Any:
        return [v] if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v) else v

    @field_validator("expo_alpha")
    @classmethod
    def _expo(cls, v: list[float]) -> list[float]:
        for a in v:
            if a < 0:
                raise ValueError(f"alpha {a} < 0 moves back toward theta_sft: that is averaging, list it under "
                                 "candidates.average_alpha (1 + alpha)")
            if a > 10:
                raise ValueError(f"alpha {a} extrapolates more than 10x the alignment delta past theta_seq; "
                                 "ExPO's useful range is a fraction of it or a few multiples")
        return _distinct(v)

    @field_validator("average_alpha")
    @classmethod
    def _average(cls, v: list[float]) -> list[float]:
        for a in v:
            if not 0 <= a <= 1:
                raise ValueError(f"alpha {a} is outside [0, 1]: an average interpolates between theta_sft (0) and "
                                 "theta_seq (1); past theta_seq it is ExPO (candidates.expo_alpha)")
        return _distinct(v)

    @field_validator("average_blocks")
    @classmethod
    def _blocks(cls, v: list[list[float]]) -> list[list[float]]:
        for anchors in v:
            if len(anchors) < 2:
                raise ValueError(f"{anchors}: give at least 2 anchors (bottom and top layer); one alpha is "
                                 "candidates.average_alpha")
            if any(not 0 <= a <= 1 for a in anchors):
                raise ValueError(f"{anchors}: every anchor is an averaging alpha in [0, 1]")
        return _distinct(v)

    @field_validator("merge_methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        for m in v:
            if m not in MERGE_METHODS:
                raise ValueError(f"unknown merge method {m!r}; known: {', '.join(sorted(MERGE_METHODS))}")
        return _distinct(v)


def _distinct(values: list) -> list:
    seen = []
    for x in values:
        if x in seen:
            raise ValueError(f"{x} is listed twice")
        seen.append(x)
    return values


#: the candidate families a tune searches besides the merge methods: one alpha each (paft.methods.candidates)
TUNE_ALPHA_FAMILIES = ("expo", "average")


class TuneConfig(_Section):
    """Merge tuning (``paft tune RUN``, and a stage of ``paft run`` when ``trials`` > 0; docs/tune.md): an Optuna
    multi-objective search over merge method x weights x density (and ExPO/averaging alpha), each candidate merged
    in memory and scored on the dev split (``data.dev_size``); the picked point is written and tested."""

    trials: int = Field(12, ge=0, description="candidates scored on the dev split; 0: `paft run` skips the stage")
    methods: list[str] = Field(
        default_factory=lambda: ["ties", "dare_ties", "task_arithmetic"],
        description="searched: merge methods of the PAFT deltas (merge.md; weights and density searched) and the "
                    "alpha families expo, average (they need run.sequential_baseline)")
    weight_range: list[float] = Field(default_factory=lambda: [0.0, 1.5],
                                      description="[low, high] of each branch weight (w_sft, w_pref)")
    density_range: list[float] = Field(default_factory=lambda: [0.2, 1.0],
                                       description="[low, high] of the density, for methods that trim (0 < low)")
    alpha_range: list[float] = Field(default_factory=lambda: [0.0, 1.0],
                                     description="[low, high] of ExPO's alpha (averaging's alpha is always [0, 1])")
    sampler: Literal["nsga2", "tpe"] = Field("nsga2", description="Optuna sampler: nsga2 (NSGAIISampler) or tpe "
                                                                  "(TPESampler), both multi-objective")
    objectives: list[str] = Field(
        default_factory=lambda: ["sft_nll", "pref_accuracy"],
        description="dev metrics to optimise, first the SFT one, then the preference one: "
                    + ", ".join(LOGLIK_METRICS) + " (log-likelihood metrics: no generation), or an lm-eval task's "
                    "harness/TASK/METRIC (scored on the task's own rows, not a dev split; docs/tune.md)")
    pick: str = Field("utopia", description="rule picking the written point from the Pareto front: utopia, or "
                                            "sft_tolerance:X (docs/tune.md)")
    timeout_s: float | None = Field(None, gt=0, description="stop asking for new trials after this many seconds "
                                                            "(a resumed tune counts anew); unset: none")
    seed: int = Field(0, description="sampler seed (a resumed study continues with seed + trials so far)")

    @field_validator("methods", "objectives", mode="before")
    @classmethod
    def _one_name(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        known = [*(m for m, s in MERGE_METHODS.items() if s.family), *TUNE_ALPHA_FAMILIES]
        if not v:
            raise ValueError("list at least one method to search")
        for m in v:
            if m not in known:
                hint = difflib.get_close_matches(m, known, n=1)
                why = " (its weights do not scale the deltas)" if m in MERGE_METHODS else ""
                raise ValueError(f"cannot search {m!r}{why}; known: {', '.join(known)}"
                                 + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return _distinct(v)

    @field_validator("weight_range", "density_range", "alpha_range")
    @classmethod
    def _range(cls, v: list[float], info) -> list[float]:
        if len(v) != 2 or v[0] > v[1]:
            raise ValueError(f"{v}: give [low, high] with low <= high")
        if info.field_name == "density_range" and not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"{v}: a density keeps a share of the entries, 0 < low <= high <= 1")
        if info.field_name == "alpha_range" and not 0 <= v[0] <= v[1] <= 10:
            raise ValueError(f"{v}: ExPO's alpha lies in [0, 10] (below 0 it is an average)")
        return v

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("give at least two objectives: an SFT metric, then a preference metric")
        out = []
        for k in v:
            if k.endswith(",none"):  # lm-eval's unfiltered metric: eval.json writes it without the filter
                k = k[: -len(",none")]
            if k not in LOGLIK_METRICS and harness_objective(k) is None:
                known = f" (a metric of eval.json, but it needs generation)" if k in METRICS else ""
                raise ValueError(f"unknown objective {k!r}{known}; known: {', '.join(LOGLIK_METRICS)}, or "
                                 "harness/TASK/METRIC with a METRIC whose direction is known (acc, acc_norm, "
                                 "exact_match, word_perplexity, ...; docs/tune.md)")
            out.append(k)
        return _distinct(out)

    @field_validator("pick")
    @classmethod
    def _pick(cls, v: str) -> str:
        parse_pick(v)  # its ValueError names the rule and the fix
        return v


BranchName = Literal["sft", "preference", "sequential"]


class RunConfig(_Section):
    output_dir: str = "runs/paft"
    parallel: bool = Field(True, description="train the SFT and preference branches concurrently")
    sequential_baseline: bool = Field(True, description="also train SFT -> preference in sequence")
    seed: int = 0
    seeds: int = Field(1, ge=1, description="`paft run`: repeat the run under this many training seeds (run.seed, "
                                            "run.seed + 1, ...) as a sweep in RUN/cells/; the report gives each "
                                            "model's mean ± std and marks differences within noise")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N, mps (a GPU setting is checked when a "
                                            "command starts)")
    bf16: Literal["auto", True, False] = Field("auto", description="bf16 autocast for training (auto: if supported)")
    threads: int | None = Field(None, gt=0, description="CPU threads in all; split between parallel branches")
    force: bool = Field(False, description="overwrite an existing output folder from a different config")
    log_every_s: float = Field(30, gt=0, description="seconds between plain progress lines when output is not a "
                                                     "terminal (a job log)")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "dvclive", "trackio"]] = Field(
        ["tensorboard"], description="training-log integrations of the Trainer (TensorBoard logs go to "
                                     "RUN/BRANCH/tb); [] or none: off")
    processes: int | dict[BranchName, int] = Field(
        1, description="processes (ranks) per branch, an int for all or a mapping {sft: 4, preference: 4, ...}; "
                       "above 1 a branch runs through `accelerate launch` (docs/scaleout.md)")
    accelerate_config: str | dict[BranchName, str] | None = Field(
        None, description="accelerate config YAML (DDP, FSDP, DeepSpeed) for a branch of several processes; a path "
                          "or a per-branch mapping; none: accelerate's plain multi-process (DDP) launch")
    backend: Literal["local", "ray"] = Field("local", description="where branches run: this machine, or a Ray "
                                                                  "cluster (one node per branch)")
    ray_address: str | None = Field(None, description="Ray cluster address for backend ray (else RAY_ADDRESS, "
                                                      "else a local Ray instance)")

    @field_validator("processes")
    @classmethod
    def _processes(cls, v: Any) -> Any:
        for n in (v.values() if isinstance(v, dict) else [v]):
            if n < 1:
                raise ValueError(f"processes must be at least 1; got {n}")
        return v

    def processes_for(self, branch: str) -> int:
        """Processes of ``branch`` (sft, preference, sequential; the reward model and the trained candidates'
        branches train in one: their callbacks and joint batches are not checked across ranks)."""
        if branch not in ("sft", "preference", "sequential"):
            return 1
        return self.processes.get(branch, 1) if isinstance(self.processes, dict) else self.processes

    def accelerate_config_for(self, branch: str) -> str | None:
        c = self.accelerate_config
        return c.get(branch) if isinstance(c, dict) else c

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE.fullmatch(v):
            raise ValueError(f"unknown device {v!r}; use auto, cpu, cuda, cuda:N or mps")
        return v

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, v: Any) -> Any:
        # `--set run.report_to=wandb` gives a string; "none" (the Trainer's word for off) means []
        if v is None or v == "none":
            return []
        return [v] if isinstance(v, str) else v


class PaftConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)  # validated on use: its check imports torch
    reward: RewardConfig = RewardConfig()
    merge: MergeConfig = MergeConfig()
    sparsity: SparsityConfig = SparsityConfig()
    eval: EvalConfig = EvalConfig()
    candidates: CandidatesConfig = CandidatesConfig()
    tune: TuneConfig = TuneConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _global_batches(self) -> "PaftConfig":
        # train.batch_size is the global batch of an optimizer step: per-device = batch_size / processes / grad_accum
        for branch, section in (("sft", "sft"), ("preference", "preference"), ("sequential", "preference")):
            t, n = getattr(self, section), self.run.processes_for(branch)
            if t.batch_size % (n * t.grad_accum):
                raise ValueError(f"{section}.batch_size {t.batch_size} is the global batch: it must divide by "
                                 f"run.processes ({n} for {branch}) x {section}.grad_accum ({t.grad_accum}); "
                                 f"use a multiple of {n * t.grad_accum}")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- identity

# run keys that change how a run executes, not what it computes (the output folder may move)
EXECUTION_KEYS = ("output_dir", "force", "parallel", "threads", "device", "report_to", "log_every_s", "processes",
                  "accelerate_config", "backend", "ray_address")


def config_identity(config: PaftConfig | dict[str, Any]) -> dict[str, Any]:
    """The resolved config as JSON without execution-only keys: what a run folder's results depend on."""
    d = json.loads(json.dumps(config.model_dump(mode="json") if isinstance(config, PaftConfig) else config))
    for k in EXECUTION_KEYS:
        d.get("run", {}).pop(k, None)
    return d


def config_digest(config: PaftConfig | dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config_identity``: a sweep cell's key."""
    text = json.dumps(config_identity(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- YAML and dotted keys

def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content; a missing file or a syntax error is one line naming the file (and line)."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the {what} (a YAML file)")
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); a {what} is a YAML file, "
                          "saved as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None


def read_run_config(root: Path) -> dict[str, Any]:
    """The config a run folder records (``ROOT/config.yaml``) as a mapping; damaged, one line with the fix."""
    path = Path(root) / "config.yaml"
    fix = "restore it, or pass --force to start the run over (this folder's outputs are removed)"
    try:
        data = read_yaml(path, "run config")
    except ConfigError as exc:
        raise ConfigError(f"{exc}; this run folder's record of its config is damaged: {fix}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: run config is a {type(data).__name__}, not a mapping of sections (model, data, "
                          f"...); the file is damaged: {fix}")
    # run.force is how the folder was made, not a setting to replay: read back into `paft tune RUN` or a rerun, it
    # would wipe the very run it names
    if isinstance(data.get("run"), dict):
        data["run"].pop("force", None)
    return data


def deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b.c=value`` -> ("a.b.c", value parsed as a YAML scalar/list)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value with a dotted key, e.g. sft.learning_rate=1e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key; a mapping is merged into the section there, so its other keys keep their values."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {key!r}: {p!r} is not a section")
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        deep_update(node[parts[-1]], copy.deepcopy(value))
    else:
        node[parts[-1]] = copy.deepcopy(value)


def get_dotted(data: dict[str, Any], key: str) -> Any:
    for p in key.split("."):
        if not isinstance(data, dict) or p not in data:
            return None
        data = data[p]
    return data


def _model_of(annotation: Any) -> Any:
    """The pydantic section class behind a field annotation; dict for free-form mappings; None for a value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is dict or annotation is dict or annotation is Any:
        return dict
    for arg in get_args(annotation):  # Optional[Section], Section | None
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def check_key(key: str, source: str) -> None:
    """A dotted key must name a config field (or lie under a free-form mapping like preference.params)."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"{source}: {key!r}: empty part in a dotted config key")
    cur: Any = PaftConfig
    for i, part in enumerate(parts):
        if cur is dict:
            return
        prefix = ".".join(parts[:i])
        if cur is None:
            raise ConfigError(f"{source}: {key!r}: {prefix!r} is a value, not a section")
        fields = cur.model_fields
        if part not in fields:
            hint = difflib.get_close_matches(part, list(fields), n=1)
            where = f"{prefix}.{hint[0]}" if prefix and hint else (hint[0] if hint else "")
            raise ConfigError(f"{source}: {key!r}: unknown config key" + (f" (did you mean {where!r}?)" if hint else ""))
        cur = _model_of(fields[part].annotation)


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel] | None = None,
                            what: str = "config key") -> str:
    """Every error of a pydantic validation in one line: ``SOURCE: config key 'a.b': problem; ...``."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            cur: Any = model or PaftConfig
            for part in e["loc"][:-1]:  # the section where the unknown key sits, for a close known one
                fields = getattr(cur, "model_fields", {})
                cur = _model_of(fields[part].annotation) if part in fields else None
            hint = difflib.get_close_matches(str(e["loc"][-1]), list(getattr(cur, "model_fields", {})), n=1)
            msg = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {what} {key!r}: {msg}" if key else f"{source}: {msg}")
    return "; ".join(lines)


# --------------------------------------------------------------------------- loading

def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                preset: str | None = None) -> PaftConfig:
    """Resolve base <- YAML file <- ``--set`` overrides, then validate.

    The base is the named preset; with no preset it is the ``default`` preset (the
    demo run) when no file is given, and the schema's own defaults under a file, so
    a user's config never inherits the demo's CPU-sized budget by accident.
    """
    if preset is None and path is None:
        preset = "default"
    data: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        data = yaml.safe_load(resources.files("paft").joinpath("presets", f"{preset}.yaml").read_text()) or {}
    source = f"preset {preset}" if preset else "defaults"
    if path is not None:
        p = Path(path)
        user = read_yaml(p, "config file") or {}
        if not isinstance(user, dict):
            raise ConfigError(f"{p}: expected a mapping of sections (model, data, sft, ...), got {type(user).__name__}")
        deep_update(data, user)
        source = str(p)
    for item in overrides or []:
        set_dotted(data, *parse_override(item))
    return validate_config(data, source)


def validate_config(data: dict[str, Any], source: str) -> PaftConfig:
    try:
        return PaftConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
