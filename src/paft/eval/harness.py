"""lm-evaluation-harness tasks on models that are already loaded, in this process.

``eval.harness_tasks`` names tasks as lm-eval does, with optional shots (``arc_challenge:25``):

- ``paft_arith``: paft's own task (``paft/eval/tasks``): the demo's arithmetic skill as a 4-way
  multiple choice scored by log-likelihood, with its rows shipped in the package (no download).
- ``leaderboard-v1``: the Open LLM Leaderboard v1 set with its standard shots (ARC-Challenge 25,
  HellaSwag 10, MMLU 5, TruthfulQA-mc2 0, Winogrande 5, GSM8K 5), as in the PAFT paper. These names
  get their standard shots when given alone too, unless ``NAME:SHOTS`` says otherwise.
- any other lm-eval task, group or tag name.

The tasks are built once (datasets loaded, shots set) and run on each model through lm-eval's
``HFLM(pretrained=model, tokenizer=tok)`` wrapper and ``lm_eval.evaluator.evaluate``: the lower
half of ``simple_evaluate``, whose upper half would rebuild the tasks and collect environment
information (a ``pip list`` subprocess, about 1 s) for every model.

Datasets are read from the local HF datasets cache first, with the hub switched off, so a cached
task never touches the network; a task whose data is not cached is downloaded when the hub is
reachable, and otherwise stops the eval with one line naming the task and how to fill the cache.
Results land in each model's metrics as ``harness/TASK/METRIC`` (lm-eval's ``METRIC,FILTER`` with
the ``none`` filter dropped; standard errors as ``METRIC_stderr``).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from paft.errors import ConfigError, DataError

PAFT_TASKS_DIR = Path(__file__).parent / "tasks"

# Open LLM Leaderboard v1: task -> standard shots, and the metric the leaderboard averaged
LEADERBOARD_V1: dict[str, int] = {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0,
                                  "winogrande": 5, "gsm8k": 5}
LEADERBOARD_V1_METRIC = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm", "mmlu": "acc", "truthfulqa_mc2": "acc",
                         "winogrande": "acc", "gsm8k": "exact_match,strict-match"}
GROUPS: dict[str, dict[str, int]] = {"leaderboard-v1": LEADERBOARD_V1}
# lm-eval's folders that hold the v1 tasks whole: indexing only these is instant (the full index takes ~10 s)
_BUILTIN_DIRS = {"arc_challenge": "arc", "hellaswag": "hellaswag", "mmlu": "mmlu/default",
                 "truthfulqa_mc2": "truthfulqa", "winogrande": "winogrande", "gsm8k": "gsm8k"}
FEWSHOT_SEED = 1234  # lm-eval's default: every model sees the same few-shot examples
_KEY = "eval.harness_tasks"


@dataclass(frozen=True)
class TaskRequest:
    name: str
    shots: int | None  # None: the task's own default
    given: str  # as written in the config, for messages


def parse_tasks(items: list[str]) -> list[TaskRequest]:
    """``eval.harness_tasks`` -> requests: groups expanded, standard shots filled in, duplicates merged."""
    out: dict[str, TaskRequest] = {}

    def add(req: TaskRequest) -> None:
        old = out.get(req.name)
        if old is not None and old.shots != req.shots:
            raise ConfigError(f"{_KEY}: {req.name} is asked for twice with different shots "
                              f"({old.given!r} and {req.given!r})")
        out.setdefault(req.name, req)

    for item in items:
        name, sep, shots = item.strip().partition(":")
        if sep and not shots.isdigit():
            raise ConfigError(f"{_KEY}: {item!r}: shots must be a whole number, e.g. arc_challenge:25")
        if name in GROUPS:
            if sep:
                raise ConfigError(f"{_KEY}: {item!r}: {name} has fixed shots; name its tasks one by one to "
                                  f"change them ({', '.join(f'{t}:{k}' for t, k in GROUPS[name].items())})")
            for task, k in GROUPS[name].items():
                add(TaskRequest(task, k, item))
        else:
            add(TaskRequest(name, int(shots) if sep else LEADERBOARD_V1.get(name), item))
    return list(out.values())


# --------------------------------------------------------------------------- task index

def _lm_eval_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


@lru_cache(maxsize=None)
def _task_manager(dirs: tuple[str, ...], defaults: bool):
    """A TaskManager over ``dirs`` (and lm-eval's own tasks when ``defaults``); cached per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(dirs), include_defaults=defaults)


_NAME_LINE = re.compile(r"^[\"']?(?:task|group|tag)[\"']?:[ \t]*[\"']?([\w.\-]+)", re.M)


@lru_cache(maxsize=1)
def _builtin_text() -> tuple[str, tuple[str, ...]]:
    """lm-eval's task YAML text (about 8 MB, read in ~1 s) and the names it declares.

    Enough to tell a typo from a task name without the full index (~10 s): lm-eval's names are
    all literal in its YAML files.
    """
    text = "\n".join(p.read_text(errors="ignore") for p in _lm_eval_tasks_dir().glob("**/*yaml") if p.is_file())
    return text, tuple(sorted(set(_NAME_LINE.findall(text))))


def _unknown(name: str, names: list[str], paft_names: list[str]) -> ConfigError:
    hits = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    return ConfigError(f"{_KEY}: unknown lm-eval task {name!r}" + (f"; did you mean {', '.join(hits)}?" if hits else "")
                       + f" (paft's own: {', '.join(paft_names)}; groups: {', '.join(GROUPS)})")


def _manager_for(name: str):
    """The TaskManager that knows ``name``: paft's folder, a v1 task's own folder, or lm-eval's full index."""
    paft_tm = _task_manager((str(PAFT_TASKS_DIR),), False)
    paft_names = list(paft_tm.all_tasks)
    if name in paft_names:
        return paft_tm, True
    if name in _BUILTIN_DIRS:
        return _task_manager((str(_lm_eval_tasks_dir() / _BUILTIN_DIRS[name]),), False), False
    text, declared = _builtin_text()
    if name not in text:  # a name lm-eval never mentions: no need for the slow index
        raise _unknown(name, list(declared) + paft_names + list(GROUPS), paft_names)
    full = _task_manager((str(PAFT_TASKS_DIR),), True)
    if name not in full.all_tasks:
        raise _unknown(name, full.all_tasks + list(GROUPS), paft_names)
    return full, False


# --------------------------------------------------------------------------- offline datasets

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect (never when the environment says offline)."""
    if any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"} for v in _OFFLINE_VARS):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_mode(enabled: bool = True) -> Iterator[None]:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE for the block, restored after.

    ``datasets`` and ``huggingface_hub`` read these once, at import, so their module constants are
    switched too; offline, an uncached dataset fails at once instead of after a minute of retries.
    """
    if not enabled:
        yield
        return
    import sys

    saved_env = {v: os.environ.get(v) for v in _OFFLINE_VARS}
    patched: list[tuple[Any, str, Any]] = []
    for mod_name, attrs in (("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
                            ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        mod = sys.modules.get(mod_name)
        for attr in attrs if mod is not None else ():
            if hasattr(mod, attr):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, True)
    for v in _OFFLINE_VARS:
        os.environ[v] = "1"
    try:
        yield
    finally:
        for mod, attr, old in reversed(patched):
            setattr(mod, attr, old)
        for v, old in saved_env.items():
            if old is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = old


def _missing_data(exc: BaseException) -> bool:
    """An error from a dataset that is neither cached nor downloadable (anywhere in the cause chain)."""
    names = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError", "HFValidationError"}
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, FileNotFoundError)) or type(exc).__name__ in names:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _dataset_of(tm, name: str, exc: BaseException) -> str | None:
    m = re.search(r"Couldn't reach '([^']+)'", str(exc))
    if m:
        return m.group(1)
    entry = tm.task_index.get(name)
    if entry is not None and entry.yaml_path:
        with contextlib.suppress(Exception):
            from lm_eval.tasks._yaml_loader import load_yaml

            return load_yaml(entry.yaml_path, resolve_func=False, recursive=True).get("dataset_path")
    return None


def _missing_data_error(req: TaskRequest, tm, exc: BaseException, reachable: bool) -> DataError:
    import datasets

    ds = _dataset_of(tm, req.name, exc)
    what = f"its dataset {ds}" if ds else "its dataset"
    where = "the hub is unreachable" if not reachable else "the download failed"
    reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    return DataError(f"{_KEY}: task {req.name!r}: {what} is not in the local HF datasets cache "
                     f"({datasets.config.HF_DATASETS_CACHE}) and {where} ({reason}); run the eval once with "
                     "network access to fill the cache, or point HF_DATASETS_CACHE and HF_HUB_CACHE at a cache "
                     "that has it")


# --------------------------------------------------------------------------- the suite

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's INFO/WARNING logs and tqdm bars off for the block (paft draws its own progress)."""
    import importlib

    from tqdm import tqdm

    def silent(*args, **kwargs):  # a partial would lose to the disable=False these calls pass
        kwargs["disable"] = True
        return tqdm(*args, **kwargs)

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    patched = []
    for name in ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface"):
        mod = importlib.import_module(name)
        if getattr(mod, "tqdm", None) is tqdm:  # these modules call tqdm without a way to turn it off
            patched.append(mod)
            mod.tqdm = silent
    try:
        yield
    finally:
        for mod in patched:
            mod.tqdm = tqdm
        logger.setLevel(level)


@dataclass
class _Built:
    req: TaskRequest
    loaded: dict[str, Any]  # TaskManager.load's {"tasks", "groups", "group_map"}


@dataclass
class HarnessSuite:
    """Tasks built once (data loaded, shots set), then run on each model with ``run``."""

    requests: list[TaskRequest]
    limit: float | None = None
    batch_size: int = 16
    chat_template: bool = False
    built: list[_Built] = field(default_factory=list)
    offline: bool = False  # the hub was unreachable when the data was loaded: stay offline when running

    @classmethod
    def build(cls, items: list[str], *, limit: float | None = None, batch_size: int = 16,
              chat_template: bool = False) -> "HarnessSuite":
        suite = cls(parse_tasks(items), limit=limit, batch_size=batch_size, chat_template=chat_template)
        if not suite.requests:
            return suite
        with _quiet():
            managers = [(req, *_manager_for(req.name)) for req in suite.requests]  # every name checked first
            reachable = None
            for req, tm, is_paft in managers:
                try:  # the cache first, with the hub off: a cached task never waits on the network
                    with offline_mode(not is_paft):
                        loaded = tm.load([req.name])
                except Exception as exc:
                    if is_paft or not _missing_data(exc):
                        raise
                    reachable = hub_reachable() if reachable is None else reachable
                    if not reachable:
                        raise _missing_data_error(req, tm, exc, False) from None
                    try:
                        loaded = tm.load([req.name])
                    except Exception as exc2:
                        if _missing_data(exc2):
                            raise _missing_data_error(req, tm, exc2, True) from None
                        raise
                suite.built.append(_Built(req, loaded))
            suite.offline = reachable is False or reachable is None
        for b in suite.built:
            for task in b.loaded["tasks"].values():
                if b.req.shots is not None:
                    task.set_config(key="num_fewshot", value=b.req.shots)
                elif task.get_config("num_fewshot") is None:
                    task.set_config(key="num_fewshot", value=0)
        return suite

    def shots(self) -> dict[str, Any]:
        out = {}
        for b in self.built:
            ks = {t.get_config("num_fewshot") for t in b.loaded["tasks"].values()}
            out[b.req.name] = ks.pop() if len(ks) == 1 else sorted(ks)
        return out

    def run(self, model, tok) -> tuple[dict[str, float], dict[str, Any]]:
        """(flat metrics ``harness/TASK/METRIC``, details: every task and subtask's numbers, shots, rows)."""
        if not self.built:
            return {}, {}
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        task_dict: dict[str, dict] = {"tasks": {}, "groups": {}, "group_map": {}}
        for b in self.built:
            for k in task_dict:
                task_dict[k].update(b.loaded.get(k) or {})
        for task in task_dict["tasks"].values():
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        limit = self.limit
        if limit is not None and limit >= 1:
            limit = int(limit)
        side = tok.padding_side
        try:
            with _quiet(), offline_mode(self.offline):
                lm = HFLM(pretrained=model, tokenizer=tok, batch_size=self.batch_size)
                res = evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=1000, log_samples=False,
                               apply_chat_template=self.chat_template, fewshot_as_multiturn=self.chat_template)
        finally:
            tok.padding_side = side
        results = res["results"]
        flat: dict[str, float] = {}
        for b in self.built:
            for name in _result_names(b):
                flat.update(_flatten(name, results.get(name, {})))
        if all(t in {b.req.name for b in self.built} for t in LEADERBOARD_V1):
            vals = [flat.get(f"harness/{t}/{m}") for t, m in LEADERBOARD_V1_METRIC.items()]
            if all(v is not None for v in vals):
                flat["harness/leaderboard-v1/average"] = sum(vals) / len(vals)
        details = {"results": {name: {k: v for k, v in r.items() if _is_number(v)} for name, r in results.items()},
                   "n_shot": res.get("n-shot", {}), "n_samples": res.get("n-samples", {})}
        return flat, details


def _result_names(b: _Built) -> list[str]:
    """The result rows a request reports in the flat metrics: its group's aggregate, or each of its tasks."""
    groups = b.loaded.get("groups") or {}
    return [b.req.name] if b.req.name in groups or b.req.name in b.loaded["tasks"] else list(b.loaded["tasks"])


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flatten(task: str, row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, v in row.items():
        if key in ("alias", "name", "sample_len") or not _is_number(v):  # stderr "N/A" when not computed
            continue
        metric, _, filt = key.partition(",")
        out[f"harness/{task}/{metric if filt in ('', 'none') else f'{metric},{filt}'}"] = float(v)
    return out
