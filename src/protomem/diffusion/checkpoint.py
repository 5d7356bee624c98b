"""Checkpoints: safetensors weights (+ EMA, + optimizer state) and a JSON state, written atomically.

Layout of a run directory::

    RUN/config.yaml                      the resolved DiffusionConfig
    RUN/metrics.parquet                  one row per logged step
    RUN/checkpoints/step_00000123/       one directory per checkpoint, moved into place complete
        model.safetensors                "model.<param>" and, with EMA, "ema.<param>"
        optimizer.safetensors            AdamW moments (kept for the latest checkpoint only)
        state.json                       step, config, threads, RNG scheme, sha256 of the files
    RUN/checkpoints/latest.json          {"step": 123}: the checkpoint a resume starts from

A checkpoint directory appears only once complete (built in a staging directory, then renamed) and
``latest.json`` is replaced atomically after it, so a kill at any moment leaves the previous checkpoint
usable. Loading verifies the format tag, the sha256 of every tensor file and every tensor's name and
shape against the model the config describes, and refuses anything else with a one-line message.

Checkpoints do not depend on the device a run trained on: tensors are written from CPU copies, always read
onto the CPU and validated there, and only then moved to the device the caller asks for.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from protomem.diffusion.config import DiffusionConfig, config_from_dict
from protomem.diffusion.device import resolve_device
from protomem.diffusion.models import build_model
from protomem.diffusion.processes import NoiseProcess, build_process
from protomem.errors import ProtomemError
from protomem.io import new_output_dir, write_json_atomic

FORMAT = "protomem.diffusion-checkpoint/1"
CHECKPOINTS = "checkpoints"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    ema_model: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
) -> Path:
    """Write checkpoint ``step`` (complete or not at all); returns its directory. Does not move latest."""
    target = checkpoint_dir(run_dir, step)
    tensors = {f"model.{name}": p.detach().cpu().contiguous() for name, p in model.state_dict().items()}
    if ema_model is not None:
        tensors.update(
            {f"ema.{name}": p.detach().cpu().contiguous() for name, p in ema_model.state_dict().items()}
        )
    with new_output_dir(target, overwrite=True) as staging:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": FORMAT})
        files = {"model.safetensors": sha256_of(staging / "model.safetensors")}
        doc = dict(state)
        if optimizer is not None:
            opt_state = optimizer.state_dict()
            opt_tensors = {
                f"{index}.{key}": value.cpu().contiguous()
                for index, entries in opt_state["state"].items()
                for key, value in entries.items()
            }
            save_file(opt_tensors, str(staging / "optimizer.safetensors"), metadata={"format": FORMAT})
            files["optimizer.safetensors"] = sha256_of(staging / "optimizer.safetensors")
            doc["optimizer_param_groups"] = opt_state["param_groups"]
        doc.update({"format": FORMAT, "step": step, "files": files})
        write_json_atomic(staging / "state.json", doc)
    return target


def mark_latest(run_dir: Path, step: int) -> None:
    write_json_atomic(Path(run_dir) / CHECKPOINTS / "latest.json", {"step": step})


def drop_optimizer_state(run_dir: Path, keep_step: int) -> None:
    """Delete optimizer files of every checkpoint but ``keep_step`` (only the latest is resumable)."""
    for path in (Path(run_dir) / CHECKPOINTS).glob("step_*/optimizer.safetensors"):
        if path.parent != checkpoint_dir(run_dir, keep_step):
            path.unlink()


def remove_checkpoint(run_dir: Path, step: int) -> None:
    shutil.rmtree(checkpoint_dir(run_dir, step), ignore_errors=True)


def latest_step(run_dir: Path) -> int | None:
    """Step of the latest complete checkpoint, or None if the run has none."""
    path = Path(run_dir) / CHECKPOINTS / "latest.json"
    if not path.is_file():
        return None
    try:
        step = json.loads(path.read_text(encoding="utf-8"))["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ProtomemError("corrupt checkpoint index (expected {'step': int})", path=path) from None
    if not isinstance(step, int):
        raise ProtomemError("corrupt checkpoint index (expected {'step': int})", path=path)
    return step


def available_steps(run_dir: Path) -> list[int]:
    steps = []
    for path in (Path(run_dir) / CHECKPOINTS).glob("step_*/state.json"):
        try:
            steps.append(int(path.parent.name.removeprefix("step_")))
        except ValueError:
            continue
    return sorted(steps)


def read_state(directory: Path, *, with_optimizer: bool = False) -> dict[str, Any]:
    """state.json of one checkpoint, checked for our format tag and intact tensor files.

    The optimizer file (absent from all but the latest checkpoint) is checked only if ``with_optimizer``.
    """
    path = directory / "state.json"
    if not directory.is_dir():
        raise ProtomemError("no such checkpoint", path=directory)
    if not path.is_file():
        raise ProtomemError("not a protomem checkpoint (no state.json)", path=directory)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtomemError(f"corrupt checkpoint state ({exc})", path=path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise ProtomemError(
            f"not a protomem diffusion checkpoint (format {found!r}, expected {FORMAT!r})", path=path
        )
    for field in ("step", "config", "files"):
        if field not in doc:
            raise ProtomemError(f"corrupt checkpoint state: missing {field!r}", path=path)
    for name, digest in doc["files"].items():
        if name == "optimizer.safetensors" and not with_optimizer:
            continue
        file = directory / name
        if not file.is_file():
            raise ProtomemError("checkpoint file missing", path=file)
        if sha256_of(file) != digest:
            raise ProtomemError("checkpoint file is corrupt (sha256 does not match state.json)", path=file)
    return doc


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ProtomemError(f"not a readable safetensors file ({exc})", path=path) from None


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> None:
    """Copy ``prefix.<name>`` tensors into ``module``, refusing missing, extra or mis-shaped tensors."""
    expected = module.state_dict()
    found = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise ProtomemError(
            f"checkpoint does not match the model: missing {missing[:3]}, unexpected {extra[:3]}", path=path
        )
    for name, value in found.items():
        if value.shape != expected[name].shape or value.dtype != expected[name].dtype:
            raise ProtomemError(
                f"checkpoint tensor {prefix}.{name} has shape {tuple(value.shape)} {value.dtype}, "
                f"the model expects {tuple(expected[name].shape)} {expected[name].dtype}",
                path=path,
            )
    module.load_state_dict(found)


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, doc: dict[str, Any]) -> None:
    path = directory / "optimizer.safetensors"
    if not path.is_file() or "optimizer_param_groups" not in doc:
        raise ProtomemError(
            "checkpoint has no optimizer state (only the latest one can be resumed)", path=directory
        )
    tensors = _load_tensors(path)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    current = optimizer.state_dict()
    if len(doc["optimizer_param_groups"]) != len(current["param_groups"]) or set(state) - set(
        range(sum(len(g["params"]) for g in current["param_groups"]))
    ):
        raise ProtomemError("optimizer state does not match the model", path=path)
    groups = []
    for saved, live in zip(doc["optimizer_param_groups"], current["param_groups"], strict=True):
        group = dict(live)
        group.update({k: v for k, v in saved.items() if k != "params"})
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


@dataclass
class LoadedCheckpoint:
    """A trained denoiser ready to sample from.

    Attributes:
        model: the denoiser in eval mode, with the EMA weights when the run kept an EMA (``uses_ema``).
        process: the noise process (its ``sample`` draws sequences).
        config: the run's DiffusionConfig (its ``device`` is the one the run trained on).
        step: the training step of this checkpoint.
        run_dir: the run directory.
        uses_ema: whether ``model`` holds EMA weights.
        device: where ``model`` lives (sampling runs there).
    """

    model: nn.Module
    process: NoiseProcess
    config: DiffusionConfig
    step: int
    run_dir: Path
    uses_ema: bool
    device: torch.device = torch.device("cpu")


def load_checkpoint(
    run_dir: str | Path,
    step: int | None = None,
    *,
    use_ema: bool = True,
    device: str | torch.device = "cpu",
) -> LoadedCheckpoint:
    """Load checkpoint ``step`` of a run (the latest if None). EMA weights are used when present.

    The tensors are read and checked on the CPU, then the model moves to ``device`` (a setting such as
    ``"auto"`` or ``"cuda:1"``, or a torch device), whatever device the run was trained on.
    """
    target = device if isinstance(device, torch.device) else resolve_device(device)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ProtomemError("no such run directory", path=run_dir)
    if step is None:
        step = latest_step(run_dir)
        if step is None:
            raise ProtomemError("run has no checkpoint yet", path=run_dir)
    directory = checkpoint_dir(run_dir, step)
    if not directory.is_dir():
        steps = available_steps(run_dir)
        raise ProtomemError(f"no checkpoint at step {step} (available: {steps})", path=run_dir)
    doc = read_state(directory)
    config = config_from_dict(doc["config"], path=directory / "state.json")
    process = build_process(config)
    model = build_model(config, process.n_input_tokens)
    tensors = _load_tensors(directory / "model.safetensors")
    has_ema = any(k.startswith("ema.") for k in tensors)
    prefix = "ema" if (use_ema and has_ema) else "model"
    load_weights(model, tensors, prefix, directory / "model.safetensors")
    model.to(target).eval()
    return LoadedCheckpoint(
        model=model,
        process=process,
        config=config,
        step=int(doc["step"]),
        run_dir=run_dir,
        uses_ema=prefix == "ema",
        device=target,
    )
