"""From a sweep file to one validated study condition per point, through the study's public API only.

Uses ``protomem.study.presets.get_preset``, ``protomem.study.config.apply_overrides`` and
``protomem.study.config.ConditionConfig``; every point is validated here, in the driver, before any
work starts, so a typo in a key fails in a second rather than on a worker.
"""

from __future__ import annotations

from typing import Any

from protomem.errors import ProtomemError
from protomem.sweep.spec import BaseCondition, SweepPoint, SweepSpec, check_sweep_device

# Each point trains with one torch thread: Ray gives every point one CPU, so the study must not probe for
# more. The first key the study config accepts is set (the study may name it either way).
THREAD_KEYS = ("diffusion.threads", "train.threads", "threads")


def _study():
    try:
        from protomem.study import config as study_config
        from protomem.study import presets
    except ImportError as exc:
        raise ProtomemError(f"the study package is not available ({exc})") from None
    return study_config, presets


def base_config(base: BaseCondition) -> Any:
    """The preset's chosen condition with the base overrides applied (a ConditionConfig)."""
    study_config, presets = _study()
    preset = presets.get_preset(base.preset)
    conditions = list(preset.conditions)
    if isinstance(base.condition, int):
        if not 0 <= base.condition < len(conditions):
            raise ProtomemError(
                f"preset {base.preset!r} has {len(conditions)} conditions; "
                f"index {base.condition} is out of range",
                where="base.condition",
            )
        chosen = conditions[base.condition]
    else:
        names = [getattr(c, "name", None) for c in conditions]
        if base.condition not in names:
            raise ProtomemError(
                f"preset {base.preset!r} has no condition named {base.condition!r} (it has {names})",
                where="base.condition",
            )
        chosen = conditions[names.index(base.condition)]
    try:
        return study_config.apply_overrides(chosen, dict(base.overrides))
    except ProtomemError as exc:
        raise ProtomemError(exc.message, where="base.overrides") from None


def with_one_thread(config: Any) -> Any:
    """``config`` with torch threads fixed to 1 (under the first key of THREAD_KEYS the study accepts)."""
    study_config, _ = _study()
    for key in THREAD_KEYS:
        try:
            return study_config.apply_overrides(config, {key: 1})
        except ProtomemError:
            continue
    return config


def point_configs(spec: SweepSpec, points: list[SweepPoint], path: object | None = None) -> dict[str, Any]:
    """Point name -> its validated ConditionConfig (one thread per point; the spec's device, if it names
    one). Errors name the sweep file ``path`` and the point (or the base field)."""
    study_config, _ = _study()
    try:
        base = base_config(spec.base)
    except ProtomemError as exc:
        raise ProtomemError(exc.message, path=path, where=exc.where or "base") from None
    configs = {}
    for point in points:
        try:
            config = study_config.apply_overrides(base, dict(point.params))
            if spec.device is not None:
                config = study_config.apply_overrides(config, {"diffusion.device": spec.device})
            check_sweep_device(point_device(config))
        except (ProtomemError, ValueError) as exc:
            message = exc.message if isinstance(exc, ProtomemError) else str(exc)
            raise ProtomemError(message, path=path, where=f"point {point.name}") from None
        configs[point.name] = with_one_thread(config)
    return configs


def point_device(config: Any) -> str:
    """The device setting of a point's config ("cpu" for a config without one, e.g. a test stand-in)."""
    diffusion = getattr(config, "diffusion", None)
    return str(getattr(diffusion, "device", "cpu"))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a ConditionConfig (stored in the manifest, compared on re-runs, where the
    device and threads do not count: a point started on one device may finish on another)."""
    return config.model_dump(mode="json")
