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
usable. Loading treats the folder as untrusted: every path it opens must resolve inside the run folder
(no links out of it, no checkpoint folder borrowed from another run), ``state.json`` must carry our
format tag, its own step and only our file names, every file must match its sha256, and every tensor
(weights, EMA, optimizer moments) must have the name, shape and dtype the model expects and finite
values (:mod:`protomem.diffusion.tensor_files`). Anything else is refused with a one-line message.

Checkpoints do not depend on the device a run trained on: tensors are written from CPU copies, always read
onto the CPU and validated there, and only then moved to the device the caller asks for.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from protomem.diffusion.config import DiffusionConfig, config_from_dict
from protomem.diffusion.device import resolve_device
from protomem.diffusion.models import build_model
from protomem.diffusion.processes import NoiseProcess, build_process
from protomem.diffusion.tensor_files import load_optimizer, load_tensors, load_weights, save_optimizer
from protomem.errors import ProtomemError
from protomem.io import new_output_dir, write_json_atomic
from protomem.textio import load_json, require_inside

FORMAT = "protomem.diffusion-checkpoint/1"
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
        save_file(tensors, str(staging / MODEL_FILE), metadata={"format": FORMAT})
        files = {MODEL_FILE: sha256_of(staging / MODEL_FILE)}
        doc = dict(state)
        if optimizer is not None:
            doc["optimizer_param_groups"] = save_optimizer(
                optimizer, staging / OPTIMIZER_FILE, metadata={"format": FORMAT}
            )
            files[OPTIMIZER_FILE] = sha256_of(staging / OPTIMIZER_FILE)
        doc.update({"format": FORMAT, "step": step, "files": files})
        write_json_atomic(staging / "state.json", doc)
    return target


def mark_latest(run_dir: Path, step: int) -> None:
    write_json_atomic(Path(run_dir) / CHECKPOINTS / "latest.json", {"step": step})


def drop_optimizer_state(run_dir: Path, keep_step: int) -> None:
    """Delete optimizer files of every checkpoint but ``keep_step`` (only the latest is resumable);
    never a file that resolves outside the run folder."""
    real_run = Path(os.path.realpath(run_dir))
    for path in (Path(run_dir) / CHECKPOINTS).glob(f"step_*/{OPTIMIZER_FILE}"):
        if (
            path.parent != checkpoint_dir(run_dir, keep_step)
            and real_run in Path(os.path.realpath(path)).parents
        ):
            path.unlink()


def remove_checkpoint(run_dir: Path, step: int) -> None:
    shutil.rmtree(checkpoint_dir(run_dir, step), ignore_errors=True)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def latest_step(run_dir: Path) -> int | None:
    """Step of the latest complete checkpoint, or None if the run has none."""
    path = Path(run_dir) / CHECKPOINTS / "latest.json"
    if not path.exists() and not path.is_symlink():
        return None
    doc = load_json(require_inside(run_dir, path), "checkpoint index")
    step = doc.get("step") if isinstance(doc, dict) else None
    if not _is_count(step):
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


def _check_resume_fields(doc: dict[str, Any], path: Path) -> None:
    """The fields a resume reads besides the tensors: run time, loss windows, threads, optimizer groups."""
    seconds = doc.get("seconds")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not seconds >= 0:
        raise ProtomemError("corrupt checkpoint state: 'seconds' must be a number >= 0", path=path)
    for name in ("eval_losses", "log_losses"):
        values = doc.get(name)
        if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise ProtomemError(f"corrupt checkpoint state: {name!r} must be a list of numbers", path=path)
    threads = doc.get("threads")
    if threads is not None and not (_is_count(threads) and threads >= 1):
        raise ProtomemError("corrupt checkpoint state: 'threads' must be a positive integer", path=path)
    if "optimizer_param_groups" not in doc:
        raise ProtomemError(
            "checkpoint has no optimizer state (only the latest one can be resumed)", path=path
        )


def read_state(directory: Path, *, with_optimizer: bool = False) -> dict[str, Any]:
    """state.json of one checkpoint (``RUN/checkpoints/step_N``), checked as untrusted input.

    Every path must resolve inside the run folder RUN; the document must carry our format tag, its own
    step N, a config mapping and sha256 digests of our own file names only, and every listed file must
    match its digest. With ``with_optimizer`` (a resume) the optimizer file (kept for the latest
    checkpoint only) and the fields a resume reads are checked too.
    """
    directory = Path(directory)
    run_dir = directory.parent.parent
    if not directory.is_dir():
        raise ProtomemError("no such checkpoint", path=directory)
    require_inside(run_dir, directory)
    path = directory / "state.json"
    if not path.exists():
        raise ProtomemError("not a protomem checkpoint (no state.json)", path=directory)
    doc = load_json(require_inside(run_dir, path), "checkpoint state")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise ProtomemError(
            f"not a protomem diffusion checkpoint (format {found!r}, expected {FORMAT!r})"[:300], path=path
        )
    for field in ("step", "config", "files"):
        if field not in doc:
            raise ProtomemError(f"corrupt checkpoint state: missing {field!r}", path=path)
    if doc["step"] != _step_of(directory):
        raise ProtomemError(
            f"corrupt checkpoint state: step {doc['step']!r} in {directory.name}"[:200], path=path
        )
    if not isinstance(doc["config"], dict):
        raise ProtomemError("corrupt checkpoint state: 'config' must be a mapping", path=path)
    files = doc["files"]
    if not (
        isinstance(files, dict)
        and MODEL_FILE in files
        and set(files) <= {MODEL_FILE, OPTIMIZER_FILE}
        and all(isinstance(d, str) and _SHA256.match(d) for d in files.values())
    ):
        raise ProtomemError(
            f"corrupt checkpoint state: 'files' must map {MODEL_FILE} (and {OPTIMIZER_FILE}) "
            "to sha256 digests",
            path=path,
        )
    if with_optimizer:
        if OPTIMIZER_FILE not in files:
            raise ProtomemError(
                "checkpoint has no optimizer state (only the latest one can be resumed)", path=directory
            )
        _check_resume_fields(doc, path)
    for name, digest in files.items():
        if name == OPTIMIZER_FILE and not with_optimizer:
            continue
        file = directory / name
        if not file.is_file():
            raise ProtomemError("checkpoint file missing", path=file)
        if sha256_of(require_inside(run_dir, file)) != digest:
            raise ProtomemError("checkpoint file is corrupt (sha256 does not match state.json)", path=file)
    return doc


def _step_of(directory: Path) -> int | None:
    digits = directory.name.removeprefix("step_")
    return int(digits) if digits.isdigit() else None


def load_model_tensors(directory: Path, model: nn.Module, ema_model: nn.Module | None) -> None:
    """Load the checkpoint's weights after checking all of them: ``model.*`` always and ``ema.*`` exactly
    when ``ema_model`` is given (the run kept an EMA), so a wrong tensor cannot hide behind the other."""
    path = directory / MODEL_FILE
    tensors = load_tensors(path)
    prefixes = ("model",) if ema_model is None else ("model", "ema")
    stray = sorted(k for k in tensors if k.split(".", 1)[0] not in prefixes)
    if stray:
        raise ProtomemError(f"checkpoint does not match the model: unexpected {stray[:3]}", path=path)
    load_weights(model, tensors, "model", path)
    if ema_model is not None:
        load_weights(ema_model, tensors, "ema", path)


def load_training_state(
    directory: Path,
    doc: dict[str, Any],
    model: nn.Module,
    ema_model: nn.Module | None,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Restore model, EMA and optimizer from a checkpoint read by ``read_state(..., with_optimizer=True)``."""
    load_model_tensors(directory, model, ema_model)
    load_optimizer(
        optimizer, directory / OPTIMIZER_FILE, doc["optimizer_param_groups"], directory / "state.json"
    )


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
    ema_model = copy.deepcopy(model) if config.ema_decay is not None else None
    load_model_tensors(directory, model, ema_model)
    prefix = "ema" if (use_ema and ema_model is not None) else "model"
    if prefix == "ema":
        model = ema_model
    model.to(target).eval()  # read and checked on the CPU, then moved
    return LoadedCheckpoint(
        model=model,
        process=process,
        config=config,
        step=int(doc["step"]),
        run_dir=run_dir,
        uses_ema=prefix == "ema",
        device=target,
    )
