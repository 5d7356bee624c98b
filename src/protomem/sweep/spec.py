"""The sweep file: a base study condition plus a grid and/or a list of points over dotted config keys.

A sweep file (YAML)::

    name: scaling                 # optional; default: the file's stem
    description: tau_mem vs P     # optional, shown in the report
    base:
      preset: quick               # a study preset (protomem.study.presets.PRESETS)
      condition: 0                # which of the preset's conditions: index or name (default 0)
      overrides:                  # dotted config keys applied to every point
        train.steps: 4000
    grid:                         # cartesian product of the listed values;
      data.n_train: [32, 64, 128] # a list of such mappings = the union of their products
      seeds:                      # a group: keys that vary together (values are mappings)
        - {grammar.seed: 0, data.seed: 1000, diffusion.seed: 0}
        - {grammar.seed: 1, data.seed: 1001, diffusion.seed: 1}
    points:                       # explicit points, added to the grid's
      - {grammar.zipf_exponent: 0.0}
    retries: 2                    # optional default for --retries
    device: cuda                  # optional: every point's diffusion.device (auto | cpu | cuda | mps)
    num_gpus: 1                   # optional: GPUs Ray reserves per CUDA point (default 1; 0.5 = two a GPU)

Each point is the base condition with the point's parameters applied
(:func:`protomem.study.config.apply_overrides`). A point is named by its parameters alone
(:func:`point_name`), so re-running a sweep finds the same run directories.

Devices: a point whose device is CUDA (``device: cuda``, or ``diffusion.device`` set per point) asks Ray
for ``num_gpus`` GPUs besides its CPU, so a cluster with GPUs runs one point per GPU; ``auto`` does so when
the cluster has GPUs. Ray hands each task its own GPU as ``cuda``, so points name ``cuda``, not ``cuda:N``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protomem.errors import ProtomemError

# A dotted config key: identifiers separated by dots (e.g. "grammar.zipf_exponent").
_KEY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_MAX_NAME_CHARS = 150


class BaseCondition(BaseModel):
    """The study condition every point starts from."""

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("quick", description="Study preset (protomem.study.presets.PRESETS).")
    condition: int | str = Field(0, description="Index or name of the condition within the preset.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted keys applied to every point.")

    @field_validator("overrides")
    @classmethod
    def _check_keys(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        for key in overrides:
            _check_key(key)
        return overrides


class SweepSpec(BaseModel):
    """A validated sweep file (see the module docstring for the format)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str = ""
    base: BaseCondition = Field(default_factory=BaseCondition)
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]] = Field(default_factory=dict)
    points: list[dict[str, Any]] = Field(default_factory=list)
    retries: int = Field(2, ge=0, description="Extra attempts for a failed or killed point.")
    device: str | None = Field(
        None, description="Every point's diffusion.device (auto | cpu | cuda | mps); None = the base's."
    )
    num_gpus: float | None = Field(
        None, ge=0.0, description="GPUs Ray reserves for each CUDA point; None = 1 (0.5 = two per GPU)."
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str | None) -> str | None:
        if device is not None:
            check_sweep_device(device)
        return device

    @field_validator("grid")
    @classmethod
    def _check_grid(cls, grid: dict | list) -> dict | list:
        for sub in [grid] if isinstance(grid, dict) else grid:
            for key, values in sub.items():
                _check_key(key)
                if not values:
                    raise ValueError(f"grid key {key!r} has no values")
                if _is_group(values):
                    for value in values:
                        for inner in value:
                            _check_key(inner)
        return grid

    @field_validator("points")
    @classmethod
    def _check_points(cls, points: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for point in points:
            for key in point:
                _check_key(key)
        return points

    def grids(self) -> list[dict[str, list[Any]]]:
        return [self.grid] if isinstance(self.grid, dict) else list(self.grid)


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep.

    Attributes:
        name: directory name, deterministic from ``params`` (see :func:`point_name`).
        params: the point's own parameters, dotted key -> value (the base overrides are not included).
    """

    name: str
    params: dict[str, Any]


def check_sweep_device(device: str) -> str:
    """A device a sweep point may name: auto, cpu, cuda or mps (not cuda:N: Ray picks the GPU)."""
    if device not in ("auto", "cpu", "cuda", "mps"):
        hint = " (Ray gives each point its own GPU: name it cuda)" if device.startswith("cuda:") else ""
        raise ValueError(f"device must be auto, cpu, cuda or mps, got {device!r}{hint}")
    return device


def ray_resources(device: str, num_gpus: float | None, cluster_gpus: float) -> dict[str, float]:
    """The Ray resources of one point: one CPU, and ``num_gpus`` (default 1) GPUs when the point runs on
    CUDA: its device is ``cuda``, or ``auto`` on a cluster that has GPUs (``cluster_gpus`` > 0)."""
    on_cuda = device.startswith("cuda") or (device == "auto" and cluster_gpus > 0)
    gpus = (1.0 if num_gpus is None else float(num_gpus)) if on_cuda else 0.0
    return {"num_cpus": 1, "num_gpus": gpus}


def _is_group(values: list[Any]) -> bool:
    """A grid entry whose values are all mappings: its key is a label, the mappings' keys vary together."""
    return bool(values) and all(isinstance(v, dict) for v in values)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_PATTERN.match(key):
        raise ValueError(f"{key!r} is not a dotted config key like 'grammar.zipf_exponent'")


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"]) or "sweep"
        if error["type"] == "extra_forbidden":
            parts.append(f"{field}: unknown key")
        else:
            parts.append(f"{field}: {error['msg'].removeprefix('Value error, ')}")
    return "invalid sweep file: " + "; ".join(parts)


def spec_from_dict(doc: object, path: str | os.PathLike | None = None) -> SweepSpec:
    """Validate a parsed sweep file; errors name ``path`` and the offending field."""
    if not isinstance(doc, dict):
        raise ProtomemError("a sweep file must be a mapping with base, grid and/or points", path=path)
    try:
        spec = SweepSpec.model_validate(doc)
    except ValidationError as exc:
        raise ProtomemError(_validation_message(exc), path=path) from None
    if spec.name is None and path is not None:
        spec = spec.model_copy(update={"name": Path(path).stem})
    if spec.name is not None and not re.match(r"^[A-Za-z0-9._-]+$", spec.name):
        raise ProtomemError(f"name {spec.name!r} may only hold letters, digits, '.', '_' and '-'", path=path)
    return spec


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a sweep file (YAML), counting its points before any grid is expanded."""
    from protomem.textio import load_yaml

    spec = spec_from_dict(load_yaml(path, "sweep file"), path=path)
    count_points(spec, path=path)
    return spec


def count_points(spec: SweepSpec, path: object | None = None) -> int:
    """Points the sweep asks for (grid products plus listed points, before removing duplicates),
    computed without expanding the grid; refused over :data:`protomem.limits.SWEEP_POINTS`."""
    from protomem import limits

    total = len(spec.points)
    for number, grid in enumerate(spec.grids()):
        if grid:
            product = 1
            for values in grid.values():
                product *= len(values)
            where = "grid" if isinstance(spec.grid, dict) else f"grid[{number}]"
            limits.SWEEP_POINTS.check(product, "grid points", path=path, where=where)
            total += product
    limits.SWEEP_POINTS.check(total, "sweep points", path=path)
    return total


def canonical_json(value: object) -> str:
    """JSON with sorted keys and no spaces: equal parameters give equal text (and equal names)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _format_value(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "-".join(_format_value(v) for v in value) or "empty"
    if isinstance(value, dict):
        return "-".join(f"{k}{_format_value(v)}" for k, v in sorted(value.items()))
    return str(value)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Dotted key -> its last component when that is unique among ``keys``, else the key with '.' -> '_'.

    Used for directory names and table columns (``data.n_train`` -> ``n_train``).
    """
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {
        key: (tail if last.count(tail) == 1 else key.replace(".", "_"))
        for key, tail in zip(keys, last, strict=True)
    }


def point_name(params: dict[str, Any]) -> str:
    """Directory name of a point: readable parameters plus a hash of all of them.

    ``{"data.n_train": 64, "seed": 1}`` -> ``"n_train=64,seed=1-3f2a9c1e"``. Keys are sorted, so the name
    depends only on the parameters; the 8-hex-digit hash keeps names unique when the readable part is
    truncated or sanitised. A point without parameters is ``"base"``.
    """
    if not params:
        return "base"
    keys = sorted(params)
    short = short_keys(keys)
    readable = ",".join(f"{short[key]}={_format_value(params[key])}" for key in keys)
    readable = re.sub(r"[^A-Za-z0-9._=,+-]", "_", readable)[:_MAX_NAME_CHARS]
    digest = hashlib.sha256(canonical_json(params).encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def expand_points(spec: SweepSpec) -> list[SweepPoint]:
    """Every point of the sweep in file order (grid products first, then the listed points).

    A group entry of the grid (values that are mappings) contributes its mappings' keys, not its label.
    Points with identical parameters are kept once. Without a grid and points the sweep has one point:
    the base condition.
    """
    count_points(spec)
    params_list: list[dict[str, Any]] = []
    for grid in spec.grids():
        if not grid:
            continue
        keys = list(grid)
        for values in itertools.product(*(grid[key] for key in keys)):
            params: dict[str, Any] = {}
            for key, value in zip(keys, values, strict=True):
                group = value if _is_group(grid[key]) else {key: value}
                for inner, inner_value in group.items():
                    if inner in params:
                        raise ProtomemError(f"grid sets {inner!r} twice (in {key!r} and before it)")
                    params[inner] = inner_value
            params_list.append(params)
    params_list.extend(dict(point) for point in spec.points)
    if not params_list:
        params_list = [{}]
    points: list[SweepPoint] = []
    seen: set[str] = set()
    for params in params_list:
        ordered = {key: params[key] for key in sorted(params)}
        text = canonical_json(ordered)
        if text in seen:
            continue
        seen.add(text)
        points.append(SweepPoint(name=point_name(ordered), params=ordered))
    return points
