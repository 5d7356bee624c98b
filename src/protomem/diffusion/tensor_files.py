"""Tensor files of a checkpoint (weights, optimizer state), read as untrusted input.

Nothing from a file reaches torch before it has been checked: every tensor's name, shape and dtype
against the module or optimizer it is meant for, every value finite, every optimizer hyperparameter of
the right type. A file that fails is a one-line :class:`~protomem.errors.ProtomemError` naming it — never
a crash inside libtorch (a reshaped AdamW moment handed to the fused kernel ends in a segfault).
Files are safetensors (no pickle). Shared by the diffusion trainer and the image study.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from protomem.errors import ProtomemError

# Per-parameter AdamW state: the moments match their parameter; ``step`` is a 0-d float counter.
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (one-line error for a truncated or tampered file)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ProtomemError(f"not a readable safetensors file ({detail})", path=path) from None


def check_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str, path: Path
) -> None:
    """Refuse missing, unexpected, mis-shaped, mis-typed or non-finite tensors (``expected``: name ->
    a tensor of the wanted shape and dtype)."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ProtomemError(
            f"{what} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}", path=path
        )
    for name, value in tensors.items():
        want = expected[name]
        if value.shape != want.shape or value.dtype != want.dtype:
            raise ProtomemError(
                f"{what} tensor {name} has shape {tuple(value.shape)} {value.dtype}, "
                f"expected {tuple(want.shape)} {want.dtype}",
                path=path,
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ProtomemError(f"{what} tensor {name} holds NaN or infinite values", path=path)


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """{name: tensor} of the tensors named ``prefix.<name>``."""
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    """Copy the ``prefix.<name>`` tensors into ``module`` after :func:`check_tensors`."""
    found = with_prefix(tensors, prefix)
    check_tensors(found, module.state_dict(), f"checkpoint ({prefix} weights)", path)
    module.load_state_dict(found)


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path, metadata: dict[str, str]) -> list[dict]:
    """Write the optimizer's per-parameter tensors (``<index>.<name>``) to ``path``; returns its
    hyperparameter groups (JSON-ready, for the checkpoint's state document)."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.detach().cpu().contiguous()  # device-free checkpoints
        for index, entries in state["state"].items()
        for key, value in entries.items()
    }
    save_file(tensors, str(path), metadata=metadata)
    return state["param_groups"]


def _expected_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    """index -> {state name -> tensor of the wanted shape and dtype} for an AdamW-family optimizer."""
    expected = {}
    index = 0
    for group in optimizer.param_groups:
        names = ADAM_MOMENTS + (("max_exp_avg_sq",) if group.get("amsgrad") else ())
        for param in group["params"]:
            entry = {name: torch.empty(param.shape, dtype=param.dtype, device="meta") for name in names}
            entry["step"] = torch.empty((), dtype=torch.float32, device="meta")
            expected[index] = entry
            index += 1
    return expected


def _check_groups(saved: object, live: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """The saved hyperparameter groups, checked against the live ones (same keys, same kinds, finite)."""
    if not isinstance(saved, list) or len(saved) != len(live):
        raise ProtomemError("optimizer_param_groups does not match the optimizer", path=path)
    groups = []
    for number, (old, new) in enumerate(zip(saved, live, strict=True)):
        where = f"optimizer_param_groups[{number}]"
        if not isinstance(old, dict) or set(old) != set(new):
            raise ProtomemError(f"{where}: keys do not match the optimizer's", path=path)
        if old["params"] != new["params"]:
            raise ProtomemError(f"{where}.params: do not match the model's parameters", path=path)
        group = dict(new)
        for key, value in old.items():
            if key == "params":
                continue
            group[key] = _check_hyperparameter(value, new[key], f"{where}.{key}", path)
        groups.append(group)
    return groups


def _check_hyperparameter(value: object, live: object, where: str, path: Path) -> object:
    """A saved hyperparameter: numbers must be finite numbers (taken from the file); flags (bool, None)
    must equal the live optimizer's, since they select its code path rather than its trajectory."""

    def is_number(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if live is None or isinstance(live, bool):
        ok = value is live
    elif isinstance(live, (int, float)):
        ok = is_number(value)
    elif isinstance(live, (tuple, list)):
        ok = isinstance(value, list) and len(value) == len(live) and all(is_number(x) for x in value)
        value = tuple(value) if ok and isinstance(live, tuple) else value
    else:
        ok = type(value) is type(live) and value == live
    if not ok:
        raise ProtomemError(f"{where}: unexpected value {value!r}"[:200], path=path)
    return value


def load_optimizer(
    optimizer: torch.optim.Optimizer, path: Path, saved_groups: object, groups_path: Path
) -> None:
    """Restore an AdamW-family optimizer from ``path`` (tensors) and ``saved_groups`` (hyperparameters,
    read from ``groups_path``), after checking every tensor's name, shape, dtype and values and every
    hyperparameter."""
    tensors = load_tensors(path)
    expected = _expected_optimizer_state(optimizer)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index_text, _, name = key.partition(".")
        if not index_text.isdigit() or int(index_text) not in expected:
            raise ProtomemError(f"optimizer state has an unexpected tensor {key!r}", path=path)
        state.setdefault(int(index_text), {})[name] = value
    for index, entries in state.items():  # a parameter that never had a gradient has no state at all
        check_tensors(
            {f"{index}.{k}": v for k, v in entries.items()},
            {f"{index}.{k}": v for k, v in expected[index].items()},
            "optimizer state",
            path,
        )
        step = float(entries["step"])
        if step < 0 or step != int(step):
            raise ProtomemError(f"optimizer state {index}.step is {step}, not a step count", path=path)
    groups = _check_groups(saved_groups, optimizer.state_dict()["param_groups"], groups_path)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
