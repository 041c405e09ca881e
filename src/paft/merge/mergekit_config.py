"""A merge plan (:class:`MergePlan`), read from the common subset of mergekit's YAML or built from flags.

Supported: ``merge_method``, ``base_model``, ``models`` (each ``model`` with
optional ``parameters``), top-level ``parameters``, ``dtype``/``out_dtype``,
``tokenizer_source`` (``base`` or a model folder; also ``tokenizer: {source: ...}``)
and paft's own ``seed`` and ``resize_vocab``. A parameter value is a number, a
*gradient* (a list of numbers, interpolated linearly over the layers, as
mergekit does: layer ``i`` of ``n`` sits at ``t = i / (n - 1)``; tensors outside
the layers use ``t = 0`` for embeddings and ``t = 1`` for the rest, mergekit's
pre/post weights), or a list of ``{filter, value}`` dicts whose first matching
filter (a substring of the tensor name; ``*`` or none matches all) wins.
A model's own parameters take precedence over the top-level ones.
``model: BASE+ADAPTER`` (mergekit's LoRA syntax) and plain adapter folders are
LoRA inputs on the shared base. Not supported (refused with a line saying so):
``slices``/``modules`` (layer stacking), ``tokenizer_source: union``, added
tokens, ``chat_template``, methods paft does not have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from paft.errors import ConfigError
from paft.methods.merging import MERGE_METHODS

#: mergekit parameter name -> paft keyword; per-model ones may differ between models
MODEL_PARAMS = {"weight": "weight", "density": "density", "gamma": "gamma", "epsilon": "epsilon"}
GLOBAL_PARAMS = {"normalize": "normalize", "lambda": "lambda_", "t": "t", "rescale": "rescale",
                 "majority_sign": "majority_sign", "int8_mask": None, "filter_wise": "filter_wise"}
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "tokenizer", "seed", "resize_vocab", "allow_base_mismatch", "name"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_PRE = re.compile(r"embed|wte|wpe|tok_embeddings|word_embeddings")


@dataclass
class ModelInput:
    """One entry of ``models``: ``ref`` as written, the resolved folder, and its raw parameter settings."""

    ref: str
    path: Path
    adapter: Path | None = None  # LoRA folder for ``BASE+ADAPTER``
    params: dict[str, Any] = field(default_factory=dict)
    key: str = ""  # where it came from, for error messages (``models[1]``)


@dataclass
class MergePlan:
    """One merge, as a mergekit YAML, ``paft merge --base/--models`` or a run's merge section describe it."""

    method: str
    base: Path | None
    models: list[ModelInput]
    params: dict[str, Any] = field(default_factory=dict)
    out_dtype: str | None = None
    tokenizer_source: str = "base"  # "base" or a folder
    seed: int = 0
    resize_vocab: bool = False
    allow_base_mismatch: bool = False  # merge an adapter whose adapter_config.json names another base
    source: str = "flags"  # the YAML file, for messages
    mergekit_defaults: bool = False


def is_mergekit_yaml(path: str | Path | None) -> bool:
    """A YAML file whose top level is a mapping with ``merge_method`` (a paft run config never has one)."""
    if path is None or not Path(path).is_file() or Path(path).suffix.lower() not in (".yaml", ".yml"):
        return False
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "merge_method" in data


def resolve_model_ref(ref: str, rel_to: Path | None, key: str) -> Path:
    """A local folder for ``ref``: as given, relative to the config's folder, or a cached Hugging Face repo."""
    candidates = [Path(ref).expanduser()]
    if rel_to is not None and not Path(ref).is_absolute():
        candidates.append(rel_to / ref)
    for c in candidates:
        if c.is_dir():
            return c
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(ref, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (or hub missing): fall through to the error
            pass
    raise ConfigError(f"{key}: model {ref!r} is not a local folder (nor a cached Hugging Face repo); "
                      "paft merge reads local folders, download it first (huggingface-cli download)")


def _check_setting(value: Any, where: str) -> None:
    if isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value):
        return
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, cond in enumerate(value):
            if "value" not in cond or set(cond) - {"filter", "value"}:
                raise ConfigError(f"{where}[{i}]: a conditional parameter needs 'value' and optional 'filter', "
                                  f"got keys {sorted(cond)}")
            if isinstance(cond["value"], list) and any(isinstance(v, dict) for v in cond["value"]):
                raise ConfigError(f"{where}[{i}].value: nested filters are not supported")
            _check_setting(cond["value"], f"{where}[{i}].value")
        return
    if isinstance(value, dict) and "value" in value and not set(value) - {"filter", "value"}:
        _check_setting(value["value"], f"{where}.value")
        return
    raise ConfigError(f"{where}: expected a number, a list of numbers (layer gradient) or a list of "
                      f"{{filter, value}} entries, got {value!r}")


def _check_params(params: Any, where: str, allowed: dict) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: must be a mapping of parameter names to values")
    for name, value in params.items():
        if name not in allowed:
            raise ConfigError(f"{where}.{name}: unknown or unsupported parameter; known: {', '.join(allowed)}")
        _check_setting(value, f"{where}.{name}")
    return dict(params)


def load_mergekit_yaml(path: str | Path) -> MergePlan:
    """Parse and validate a mergekit YAML; model references become local folders."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML ({exc})") from None
    if not isinstance(data, dict) or "merge_method" not in data:
        raise ConfigError(f"{path}: not a mergekit config (no top-level merge_method)")
    src = str(path)
    for key in ("slices", "modules"):
        if key in data:
            raise ConfigError(f"{src}: {key}: layer slicing/stacking is not supported by paft merge; "
                              "list whole models under 'models'")
    if "chat_template" in data:
        raise ConfigError(f"{src}: chat_template: not supported; the tokenizer source's template is copied")
    if unknown := sorted(set(data) - _TOP_KEYS):
        raise ConfigError(f"{src}: {unknown[0]}: unknown top-level key; known: {', '.join(sorted(_TOP_KEYS))}")
    method = data["merge_method"]
    if method not in MERGE_METHODS:
        raise ConfigError(f"{src}: merge_method {method!r} is not supported; paft has: {', '.join(MERGE_METHODS)}")
    rel = path.parent
    base = resolve_model_ref(str(data["base_model"]), rel, f"{src}: base_model") if data.get("base_model") else None
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{src}: models: give a non-empty list of {{model: PATH, parameters: {{...}}}}")
    allowed = {**MODEL_PARAMS, **GLOBAL_PARAMS}
    models = []
    for i, entry in enumerate(entries):
        key = f"{src}: models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{key}: needs a 'model' key")
        if extra := sorted(set(entry) - {"model", "parameters"}):
            raise ConfigError(f"{key}.{extra[0]}: unknown key; known: model, parameters")
        params = _check_params(entry.get("parameters"), f"{key}.parameters", MODEL_PARAMS)
        models.append(_model_input(str(entry["model"]), rel, key, params))
    gparams = _check_params(data.get("parameters"), f"{src}: parameters", allowed)
    tok = data.get("tokenizer_source")
    if data.get("tokenizer") is not None:
        if tok is not None:
            raise ConfigError(f"{src}: give tokenizer_source or tokenizer, not both")
        t = data["tokenizer"]
        if not isinstance(t, dict) or set(t) - {"source"}:
            raise ConfigError(f"{src}: tokenizer: only 'source' is supported (no added tokens or padding)")
        tok = t.get("source")
    tok = "base" if tok is None else str(tok)
    if tok == "union":
        raise ConfigError(f"{src}: tokenizer_source: union is not supported (vocabularies are not remapped); "
                          "use base or one model's folder")
    if tok != "base":
        tok = str(resolve_model_ref(tok, rel, f"{src}: tokenizer_source"))
    dtype = data.get("out_dtype") or data.get("dtype")
    resize, allow = data.get("resize_vocab", False), data.get("allow_base_mismatch", False)
    for key, value in (("resize_vocab", resize), ("allow_base_mismatch", allow)):
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: {key} must be true or false, got {value!r}")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{src}: seed must be an integer, got {seed!r}")
    return MergePlan(method=method, base=base, models=models, params=gparams,
                     out_dtype=str(dtype) if dtype is not None else None, tokenizer_source=tok, seed=seed,
                     resize_vocab=resize, allow_base_mismatch=allow, source=src, mergekit_defaults=True)


def _model_input(ref: str, rel: Path | None, key: str, params: dict) -> ModelInput:
    """``ref`` resolved to a folder; ``BASE+ADAPTER`` (mergekit's LoRA syntax) to a model and its adapter."""
    where = f"{key}.model" if rel is not None else key  # a YAML entry, or a flag
    if "+" in ref and not Path(ref).exists():
        model_ref, lora_ref = ref.split("+", 1)
        lora = resolve_model_ref(lora_ref, rel, f"{where} (LoRA part)" if rel is not None else key)
        return ModelInput(ref, resolve_model_ref(model_ref, rel, where), lora, params, key)
    return ModelInput(ref, resolve_model_ref(ref, rel, where), None, params, key)


#: paft's keyword -> mergekit's parameter name (``lambda_`` -> ``lambda``)
_MERGEKIT_NAME = {kw: name for name, kw in {**MODEL_PARAMS, **GLOBAL_PARAMS}.items() if kw}


def plan_from_flags(base: str | Path, models: list[str | Path], method: str, *,
                    weights: list[float] | None = None, density: float | list[float] | None = None,
                    params: dict | None = None, dtype: str | None = None, tokenizer_source: str | None = None,
                    seed: int = 0, resize_vocab: bool = False, allow_base_mismatch: bool = False,
                    source: str = "command line") -> MergePlan:
    """The plan of ``--base B --models M1 M2 ...`` or of a run's merge section (weights and density default to 1).

    ``params`` are method parameters under mergekit's names or paft's keywords (``lambda`` or ``lambda_``).
    """
    if method not in MERGE_METHODS:
        raise ConfigError(f"--method: unknown merge method {method!r}; known: {', '.join(MERGE_METHODS)}")
    if not models:
        raise ConfigError("--models: give at least one model or adapter folder")
    n = len(models)
    density = [density] if isinstance(density, (int, float)) else density
    for flag, values in (("--weights", weights), ("--density", density)):
        if values is not None and len(values) not in (1, n):
            raise ConfigError(f"{flag}: got {len(values)} values for {n} models; give one, or one per model")
    inputs = []
    for i, ref in enumerate(models):
        p: dict[str, Any] = {}
        if weights is not None:
            p["weight"] = weights[i if len(weights) == n else 0]
        if density is not None:
            p["density"] = density[i if len(density) == n else 0]
        inputs.append(_model_input(str(ref), None, f"--models[{i}]", p))
    plan_params = {_MERGEKIT_NAME.get(k, k): v for k, v in (params or {}).items()}
    allowed = [k for k in {**MODEL_PARAMS, **GLOBAL_PARAMS} if k not in ("weight", "density")]  # arguments here
    if unknown := [k for k in plan_params if k not in allowed]:
        raise ConfigError(f"{source}: unknown merge parameter {unknown[0]!r}; known: {', '.join(allowed)}")
    tok = tokenizer_source or "base"
    if tok != "base":
        tok = str(resolve_model_ref(tok, None, "--tokenizer-source"))
    return MergePlan(method=method, base=resolve_model_ref(str(base), None, "--base"), models=inputs,
                     params=plan_params, out_dtype=dtype, tokenizer_source=tok, seed=seed,
                     resize_vocab=resize_vocab, allow_base_mismatch=allow_base_mismatch, source=source)


# --- per-tensor evaluation ----------------------------------------------------------------------

def layer_index(name: str) -> int | None:
    """``model.layers.3.mlp.up_proj.weight`` -> 3; None outside the layer stack."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's ``t`` for a tensor: ``i / (n - 1)`` in layer ``i`` (1 with one layer); 0 before, 1 after."""
    i = layer_index(name)
    if i is None:
        return 0.0 if _PRE.search(name) else 1.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, i / (num_layers - 1))


def evaluate_setting(name: str, setting: Any, t: float) -> Any:
    """The value of a setting for tensor ``name`` at layer position ``t``; None when no filter matches."""
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, dict):
        setting = [setting]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
        if len(setting) == 1:
            return float(setting[0])
        pos = t * (len(setting) - 1)
        i0 = min(int(pos), len(setting) - 1)
        i1 = min(i0 + 1, len(setting) - 1)
        frac = pos - i0
        return (1.0 - frac) * float(setting[i0]) + frac * float(setting[i1])
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or str(flt) in name:
            return evaluate_setting(name, cond["value"], t)
    return None
