"""The sweep file: its schema, and its expansion into cells, each with a validated config and its key."""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from paft.config import (EXECUTION_KEYS, PRESETS, PaftConfig, check_key, config_digest, deep_update,
                         format_validation_error, get_dotted, load_config, parse_override, read_yaml, set_dotted,
                         validate_config)
from paft.errors import ConfigError


SEED_AXIS = "run.seed"  # a sweep axis over it becomes mean ± std, not a dimension of the grid


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RaySettings(_Strict):
    address: str | None = Field(None, description="a Ray cluster (ray://host:10001 or auto); unset: a local instance")


class ExecutionSettings(_Strict):
    backend: Literal["local", "ray"] = "local"
    workers: int = Field(1, gt=0, description="local: cells at once; the CPU threads are split between them")
    num_cpus: float = Field(1, gt=0, description="ray: CPUs per cell (also its torch threads)")
    num_gpus: float = Field(0, ge=0, description="ray: GPUs per cell")
    ray: RaySettings = RaySettings()


class ReportSettings(_Strict):
    metrics: list[str] | None = Field(None, description="results columns to plot; default: PAFT's headline metrics")


class SweepSpec(_Strict):
    name: str | None = None
    preset: Literal[PRESETS] | None = None
    base_config: str | None = Field(None, description="a paft config file, relative to the sweep file")
    base: dict[str, Any] = Field(default_factory=dict, description="config applied over preset / base_config")
    axes: dict[str, Annotated[list[Any], Field(min_length=1)]] | None = None
    cells: list[dict[str, Any]] | None = Field(None, min_length=1)
    mode: Literal["run", "sft", "preference"] = "run"
    sweep: ExecutionSettings = ExecutionSettings()
    report: ReportSettings = ReportSettings()

    @model_validator(mode="after")
    def _one_kind(self) -> "SweepSpec":
        if (self.axes is None) == (self.cells is None):
            raise ValueError("give either `axes` (a grid) or `cells` (a list), not both and not neither")
        return self


@dataclass
class Cell:
    key: str  # first 12 hex digits of digest: the folder name
    digest: str  # sha256 of the resolved config without execution-only keys
    labels: dict[str, Any]  # column -> value shown in tables (an axis value's label when it has one)
    values: dict[str, Any]  # dotted config key -> the value applied
    config: dict[str, Any]  # the resolved config (JSON), run.output_dir not yet set


@dataclass
class Sweep:
    spec: SweepSpec
    source: str  # the sweep file (for messages)
    columns: list[str]  # axis columns, in file order
    cells: list[Cell]


def _label(v: Any) -> tuple[Any, Any]:
    """(label, value) of an axis entry: ``{label: ..., value: ...}`` or a bare value."""
    if isinstance(v, dict) and set(v) == {"label", "value"}:
        return v["label"], v["value"]
    if isinstance(v, (dict, list)):  # unlabelled structure: a compact, stable column value
        return json.dumps(v, sort_keys=True, separators=(",", ":")), v
    return v, v


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Parse and validate a sweep file and build every cell's config (nothing runs)."""
    path = Path(path)
    raw = read_yaml(path, "sweep file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping (base, axes or cells, mode, sweep), got {type(raw).__name__}")
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path), SweepSpec, "sweep key")) from None
    return expand(spec, path, overrides)


def _base_dict(spec: SweepSpec, sweep_path: Path, overrides: list[str] | None) -> dict[str, Any]:
    """preset <- base_config <- inline base <- --set, as `paft run` resolves a file (validated here once)."""
    if spec.base_config:
        base_path = Path(spec.base_config)
        if not base_path.is_absolute():
            base_path = sweep_path.parent / base_path
        cfg = load_config(base_path, preset=spec.preset)
    elif spec.preset or not spec.base:
        cfg = load_config(None, preset=spec.preset or "default")
    else:  # an inline base is a config file of its own: over the schema's defaults, not the demo budget
        cfg = PaftConfig()
    data = cfg.model_dump(mode="json")
    deep_update(data, copy.deepcopy(spec.base))
    for item in overrides or []:
        key, value = parse_override(item)
        check_key(key, f"--set {item!r}")
        set_dotted(data, key, value)
    validate_config(data, f"{sweep_path}: base")
    return data


def expand(spec: SweepSpec, sweep_path: Path, overrides: list[str] | None = None) -> Sweep:
    base = _base_dict(spec, sweep_path, overrides)
    if spec.axes is not None:
        columns = list(spec.axes)
        for key in columns:
            check_key(key, f"{sweep_path}: axes")
        entries = [[_label(v) for v in spec.axes[k]] for k in columns]
        combos = [dict(zip(columns, combo)) for combo in itertools.product(*entries)]
    else:
        columns = list(dict.fromkeys(k for c in spec.cells for k in c))
        for i, c in enumerate(spec.cells):
            for key in c:
                check_key(key, f"{sweep_path}: cells[{i}]")
        combos = [{k: _label(v) for k, v in c.items()} for c in spec.cells]
    cells: list[Cell] = []
    seen: dict[str, int] = {}
    for i, combo in enumerate(combos):
        data = copy.deepcopy(base)
        for key, (_, value) in combo.items():
            set_dotted(data, key, value)
        desc = ", ".join(f"{k}={lab}" for k, (lab, _) in combo.items())
        resolved = validate_config(data, f"{sweep_path}: cell {i + 1} ({desc})").model_dump(mode="json")
        digest = config_digest(resolved)
        if digest in seen:
            raise ConfigError(f"{sweep_path}: cells {seen[digest] + 1} and {i + 1} ({desc}) resolve to the same config "
                              f"(they differ only in execution keys run.{'/'.join(sorted(EXECUTION_KEYS))})")
        seen[digest] = i
        # a key a cell does not set shows the value it resolved to (cells: lists may set different keys)
        labels = {k: combo[k][0] if k in combo else get_dotted(resolved, k) for k in columns}
        cells.append(Cell(digest[:12], digest, labels, {k: v for k, (_, v) in combo.items()}, resolved))
    return Sweep(spec, str(sweep_path), columns, cells)
