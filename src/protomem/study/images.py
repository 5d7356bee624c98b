"""The memorization study on images: a small DDPM on 8x8 digits, audited along training.

Which training digits does an image diffusion model copy first — the typical or the rare ones? The
pipeline, top to bottom:

1. Draw ``n_train`` digits from scikit-learn's bundled 8x8 digits (1,797 images, no download), a
   seeded subset with every class present; the other digits are held out.
2. Train :class:`protomem.diffusion.images.ImageUNet` (epsilon prediction, cosine schedule) on them.
3. At log-spaced steps, draw ``eval_samples`` images (ancestral sampling, seed derived from the step) and
   audit them against the training digits with the audit's detectors (d1/d2 < 1/3 is the primary copy
   criterion; L2, tiled L2 and exact copies are recorded too).
4. Per training digit: copies at every evaluation, the first step with >= ``copies_for_memorized``
   copies (time to memorization), and two density prototypicality scores: mean RMS distance to the
   k nearest other training digits, and to the k nearest digits of the whole data set.
5. Statistics: Spearman correlation of time to memorization with each density score (bootstrap CI,
   permutation p) and survival curves ("not yet memorized") by density quartile. The null: the
   held-out digits — samples of a model that generalizes perfectly — run through the same detector,
   so a bias of the criterion itself towards dense or isolated training digits shows up.

Resumable: a checkpoint (weights, optimizer, random state) follows every evaluation; ``resume=True``
continues from it and reproduces the same samples.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from protomem.errors import ProtomemError
from protomem.io import ARRAY_FILE_ERRORS, atomic_path, write_json_atomic, write_text_atomic
from protomem.outputs import apply_umask_modes


@dataclass(frozen=True)
class ImageStudyPreset:
    """Every setting of an image-study run (recorded in config.json)."""

    name: str
    n_train: int = 96
    width: int = 16
    timesteps: int = 100
    steps: int = 6000
    batch_size: int = 64
    lr: float = 2e-3
    n_evals: int = 12
    first_eval: int = 200
    eval_samples: int = 384
    copies_for_memorized: int = 2
    density_k: int = 5
    seed: int = 0


PRESETS = {
    "quick": ImageStudyPreset(
        "quick",
        n_train=10,
        width=8,
        timesteps=50,
        steps=300,
        lr=3e-3,
        n_evals=3,
        first_eval=100,
        eval_samples=32,
        density_k=3,
    ),
    "default": ImageStudyPreset("default"),
}


def get_image_preset(name: str) -> ImageStudyPreset:
    if name not in PRESETS:
        raise ProtomemError(f"unknown image-study preset {name!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[name]


def eval_schedule(preset: ImageStudyPreset) -> list[int]:
    """Log-spaced evaluation steps from ``first_eval`` to ``steps`` (distinct integers, final included)."""
    steps = np.unique(np.rint(np.geomspace(preset.first_eval, preset.steps, preset.n_evals)).astype(int))
    return [int(s) for s in steps]


def load_digit_subset(n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Class-balanced digits: (images (n, 8, 8, 1) in [0, 1], dataset indices, labels, all 1797 digits)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[..., None]
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(10)]
    chosen = [per_class[i % 10][i // 10] for i in range(n_train)]
    index = np.sort(np.array(chosen, dtype=np.int64))
    return images[index], index, labels[index], images


def _pick_threads(threads: int | None, probe) -> int:
    """The torch thread count: as asked, else the faster of 1 and all cores on a short probe."""
    import torch

    if threads is not None:
        return max(1, threads)
    cores = os.cpu_count() or 1
    if cores == 1:
        return 1
    timings = {}
    for n in (1, cores):
        torch.set_num_threads(n)
        probe()  # warm-up
        start = time.perf_counter()
        probe()
        timings[n] = time.perf_counter() - start
    return min(timings, key=timings.get)


def _versions() -> dict[str, str]:
    import sklearn
    import torch

    import protomem

    return {
        "protomem": getattr(protomem, "__version__", "unknown"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "scikit-learn": sklearn.__version__,
    }


CHECKPOINT_FORMAT = "protomem.image-study-checkpoint/1"
_CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors")


def _save_checkpoint(run: Path, model, optimizer, generator, step: int, losses: list[float]) -> None:
    """run/checkpoint/: weights and AdamW tensors as safetensors, the rest (step, losses, optimizer
    hyperparameters, generator state, sha256 of the tensor files) in state.json. No pickle."""
    import base64

    from safetensors.torch import save_file

    from protomem.diffusion.checkpoint import sha256_of
    from protomem.diffusion.tensor_files import save_optimizer

    final = run / "checkpoint"
    staging = run / ".checkpoint.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    save_file(  # CPU copies: the checkpoint does not depend on the device
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        str(staging / "model.safetensors"),
    )
    groups = save_optimizer(optimizer, staging / "optimizer.safetensors", {"format": CHECKPOINT_FORMAT})
    doc = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "losses": losses,
        "optimizer_param_groups": groups,
        "generator_state": base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii"),
        "files": {name: sha256_of(staging / name) for name in _CHECKPOINT_FILES},
    }
    write_json_atomic(staging / "state.json", doc)
    apply_umask_modes(staging)
    old = run / ".checkpoint.old"
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)


def _read_checkpoint_state(run: Path) -> dict:
    """run/checkpoint/state.json, checked: our format, paths inside the run, intact tensor files, a step
    count and a list of finite-or-NaN losses as long as the step count."""
    from protomem.diffusion.checkpoint import sha256_of
    from protomem.textio import load_json, require_inside

    directory = run / "checkpoint"
    if (directory / "state.pt").exists() and not (directory / "state.json").exists():
        raise ProtomemError(
            "checkpoint written by an older protomem (state.pt, a pickle, is not read): "
            "start the run again with --overwrite",
            path=directory,
        )
    path = require_inside(run, directory / "state.json")
    doc = load_json(path, "checkpoint state")
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise ProtomemError(
            f"not an image-study checkpoint (expected format {CHECKPOINT_FORMAT!r})", path=path
        )
    step, losses, files = doc.get("step"), doc.get("losses"), doc.get("files")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ProtomemError("corrupt checkpoint state: 'step' must be a count", path=path)
    if (
        not isinstance(losses, list)
        or len(losses) != step
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in losses)
    ):
        raise ProtomemError("corrupt checkpoint state: 'losses' must hold one number per step", path=path)
    if not isinstance(files, dict) or set(files) != set(_CHECKPOINT_FILES):
        raise ProtomemError(
            f"corrupt checkpoint state: 'files' must list {list(_CHECKPOINT_FILES)}", path=path
        )
    for name, digest in files.items():
        file = require_inside(run, directory / name)
        if not file.is_file() or sha256_of(file) != digest:
            raise ProtomemError("checkpoint file missing or corrupt (sha256 does not match)", path=file)
    if not isinstance(doc.get("generator_state"), str):
        raise ProtomemError("corrupt checkpoint state: 'generator_state' missing", path=path)
    return doc


def _load_checkpoint(run: Path, model, optimizer, generator) -> tuple[int, list[float]]:
    """Restore model, optimizer and generator from run/checkpoint (every tensor checked first)."""
    import base64
    import binascii

    import torch

    from protomem.diffusion.tensor_files import load_optimizer, load_tensors, load_weights

    doc = _read_checkpoint_state(run)
    directory = run / "checkpoint"
    weights = directory / "model.safetensors"
    load_weights(model, {f"model.{k}": v for k, v in load_tensors(weights).items()}, "model", weights)
    load_optimizer(
        optimizer,
        directory / "optimizer.safetensors",
        doc["optimizer_param_groups"],
        directory / "state.json",
    )
    expected = generator.get_state()
    try:
        raw = base64.b64decode(doc["generator_state"], validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != expected.numel():
        raise ProtomemError("corrupt checkpoint state: bad 'generator_state'", path=directory / "state.json")
    generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    return doc["step"], [float(v) for v in doc["losses"]]


def _read_evals(run: Path) -> list[dict]:
    from protomem.textio import load_json, require_inside

    path = run / "evals.json"
    if not path.exists():
        return []
    evals = load_json(require_inside(run, path), "evaluation record")
    if not isinstance(evals, list) or not all(
        isinstance(e, dict) and isinstance(e.get("step"), int) for e in evals
    ):
        raise ProtomemError("corrupt evaluation record (expected a list of evaluations)", path=path)
    return evals


def run_image_study(
    out_dir: str | os.PathLike,
    *,
    preset: str = "default",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    threads: int | None = None,
    device: str | None = None,
) -> Path:
    """Run the image memorization study into ``out_dir``; returns it. See the module docstring.

    ``device``: ``auto | cpu | cuda | cuda:N | mps`` (None = auto: CUDA when torch sees one, else the CPU).
    """
    import torch

    from protomem.audit.core import AuditConfig, audit_images
    from protomem.diffusion.device import device_label, resolve_device
    from protomem.diffusion.images import ImageUNet, NoiseSchedule, diffusion_loss, sample_images

    settings = get_image_preset(preset)
    target = resolve_device(device or "auto")
    run = Path(out_dir)
    from protomem.outputs import check_dir_target

    check_dir_target(run, overwrite=overwrite)
    if run.exists() and any(run.iterdir()):
        if overwrite:
            shutil.rmtree(run)
        elif not resume:
            raise ProtomemError(
                "run directory exists and is not empty (pass --overwrite or --resume)", path=run
            )
        else:
            recorded = _recorded_preset(run)
            if recorded != asdict(settings):
                raise ProtomemError(f"cannot resume: the run used preset {recorded.get('name')!r}", path=run)
    run.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    caller_threads = torch.get_num_threads()

    train01, dataset_index, labels, all_digits = load_digit_subset(settings.n_train, settings.seed)
    x_train = torch.tensor(train01.transpose(0, 3, 1, 2) * 2 - 1).to(target)
    torch.manual_seed(settings.seed)
    model = ImageUNet(channels=1, width=settings.width).to(target)  # initialised on the CPU, then moved
    schedule = NoiseSchedule(settings.timesteps).to(target)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    generator = torch.Generator(device=target).manual_seed(settings.seed)

    def probe() -> None:
        copy = ImageUNet(channels=1, width=settings.width)
        cpu_schedule = NoiseSchedule(settings.timesteps)
        for _ in range(5):
            diffusion_loss(
                copy, cpu_schedule, x_train[: settings.batch_size].cpu(), torch.Generator().manual_seed(0)
            ).backward()

    # the thread probe times the CPU; on an accelerator keep torch's thread count
    n_threads = _pick_threads(threads, probe) if target.type == "cpu" else threads or caller_threads
    torch.set_num_threads(n_threads)
    config_doc = {
        "preset": asdict(settings),
        "threads": n_threads,
        "device": str(target),
        "device_label": device_label(target),
        "eval_steps": eval_schedule(settings),
        "versions": _versions(),
        "data": "sklearn.datasets.load_digits (8x8, 1797 images)",
    }
    if not (run / "config.json").exists():
        write_json_atomic(run / "config.json", config_doc)
        with atomic_path(run / "train.npz") as tmp, open(tmp, "wb") as handle:
            np.savez(handle, images=train01, dataset_index=dataset_index, labels=labels)

    step, losses = 0, []
    evals = _read_evals(run)
    if resume and (run / "checkpoint").exists():
        step, losses = _load_checkpoint(run, model, optimizer, generator)
        evals = [e for e in evals if e["step"] <= step]
    eval_steps = [s for s in eval_schedule(settings) if s > step]
    done_steps = {e["step"] for e in evals}
    audit_config = AuditConfig(batch_size=1024)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]image study[/bold] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not progress,
    )
    try:
        with bar:
            task = bar.add_task("training steps", total=settings.steps, completed=step)
            model.train()
            while step < settings.steps:
                batch = x_train[
                    torch.randint(
                        0, settings.n_train, (settings.batch_size,), generator=generator, device=target
                    )
                ]
                loss = diffusion_loss(model, schedule, batch, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                step += 1
                bar.advance(task)
                if eval_steps and step == eval_steps[0]:
                    eval_steps.pop(0)
                    if step not in done_steps:
                        bar.update(task, description=f"sampling and auditing at step {step}")
                        evals.append(
                            _evaluate(
                                model,
                                schedule,
                                settings,
                                step,
                                train01,
                                losses,
                                audit_config,
                                sample_images,
                                audit_images,
                            )
                        )
                        write_text_atomic(run / "evals.json", json.dumps(evals))
                        bar.update(task, description="training steps")
                    _save_checkpoint(run, model, optimizer, generator, step, losses)
        summary = analyse(run, settings, evals, train01, dataset_index, labels, all_digits, losses)
        summary["seconds"] = time.perf_counter() - started
        summary["threads"] = n_threads
        summary["device"] = str(target)
        write_image_study_report(run, summary)
        summary["status"] = "complete"
        write_json_atomic(run / "summary.json", _json_ready(summary))
    finally:
        torch.set_num_threads(caller_threads)
    return run


def _evaluate(
    model, schedule, settings, step, train01, losses, audit_config, sample_images, audit_images
) -> dict:
    """Sample, audit against the training digits, and return the evaluation record."""
    started = time.perf_counter()
    samples = sample_images(
        model, schedule, settings.eval_samples, (1, 8, 8), seed=settings.seed * 1_000_003 + step
    )
    images = ((samples.numpy() + 1) / 2).transpose(0, 2, 3, 1).astype(np.float32)
    result = audit_images(train01, images, audit_config, density=False)
    m = result.matches
    n = len(train01)
    per_item = {}
    for flag in ("ratio", "l2", "tiled", "exact"):
        hits = m.loc[m[flag], "nearest_train" if flag != "exact" else "exact_train"].to_numpy()
        per_item[flag] = np.bincount(hits, minlength=n).tolist()
    recent = losses[-100:]
    return {
        "step": step,
        "loss": float(np.mean(recent)),
        "frac_ratio": float(m["ratio"].mean()),
        "frac_l2": float(m["l2"].mean()),
        "frac_tiled": float(m["tiled"].mean()),
        "frac_exact": float(m["exact"].mean()),
        "median_d1": float(m["d1"].median()),
        "median_ratio": float(m["d1_over_d2"].median()),
        "median_d1_copies": float(m.loc[m["ratio"], "d1"].median()) if m["ratio"].any() else None,
        "copies": per_item,
        "samples": np.rint(images[:64, ..., 0] * 255).astype(np.uint8).tolist(),
        "nearest": m["nearest_train"].to_numpy()[:64].tolist(),
        "sample_seconds": time.perf_counter() - started,
    }


def detector_bias(
    train01: np.ndarray, sigma: float, seed: int, replicates: int = 20
) -> dict[str, np.ndarray]:
    """A uniform copier: each training digit copied ``replicates`` times with Gaussian noise of RMS ``sigma``.

    Returns, per criterion ("ratio", "l2"), the (P,) probability that such a noisy copy is flagged as a
    copy of its own source. Any correlation of it with density is a bias of the criterion, not of a model.
    """
    from protomem.audit.core import AuditConfig, audit_images

    rng = np.random.default_rng(seed)
    n = len(train01)
    hits = {"ratio": np.zeros(n), "l2": np.zeros(n)}
    for _ in range(replicates):
        noisy = np.clip(train01 + rng.normal(0, sigma, train01.shape), 0, 1).astype(np.float32)
        m = audit_images(train01, noisy, AuditConfig(), density=False).matches
        own = m["nearest_train"].to_numpy() == np.arange(n)
        for flag in hits:
            hits[flag] += m[flag].to_numpy() & own
    return {flag: count / replicates for flag, count in hits.items()}


CRITERION_NAMES = {"ratio": "d1/d2 < 1/3", "l2": "L2 (RMS <= 0.05)"}


def _biased(main: dict, bias: dict) -> bool:
    """True when the criterion's own density bias (uniform copier) points the same way as the result."""
    if not (np.isfinite(bias["rho"]) and np.isfinite(main["rho"])):
        return False
    return bias["p_permutation"] < 0.05 and np.sign(bias["rho"]) == np.sign(-main["rho"])


def image_verdict(statistics: dict, bias_stats: dict, sigma: float, n: int, settings) -> tuple[str, str]:
    """The verdict sentence and the criterion it rests on: the criterion whose detector check shows the
    weaker density bias (smaller |rho| of a uniform copier's flag probability with density) leads; the
    other is reported after it, marked when its bias points the way of its result."""
    order = ["ratio", "l2"]

    def bias_size(criterion: str) -> float:
        rho = bias_stats[criterion]["rho"]
        return abs(rho) if np.isfinite(rho) else np.inf

    headline = min(order, key=bias_size)
    parts = []
    for criterion in [headline] + [c for c in order if c != headline]:
        main, bias = statistics[f"{criterion}:density_train"], bias_stats[criterion]
        name = CRITERION_NAMES[criterion]
        if not np.isfinite(main["rho"]):
            parts.append(f"Under {name}, {main['n_memorized']} of {n} digits were memorized: no test.")
            continue
        numbers = (
            f"Spearman rho = {main['rho']:+.2f} between density and time to memorization, 95% CI "
            f"[{main['ci_low']:+.2f}, {main['ci_high']:+.2f}], permutation p = {main['p_permutation']:.3g}"
        )
        if main["p_permutation"] < 0.05:
            who = "typical (dense)" if main["rho"] > 0 else "rare (isolated)"
            claim = f"the {who} training digits are memorized first ({numbers})"
        else:
            claim = f"the data do not show whether typical or rare digits are memorized first ({numbers})"
        check = ""
        if np.isfinite(bias["rho"]):
            check = (
                f"; detector check (every digit copied with noise RMS {sigma:.3f}): flag probability vs "
                f"density rho = {bias['rho']:+.2f}, p = {bias['p_permutation']:.3g}"
            )
            if _biased(main, bias):
                check += ", a bias of the criterion in the same direction, so this ordering is not evidence"
        parts.append(
            f"Under {name}, {main['n_memorized']} of {n} training digits were copied (>= "
            f"{settings.copies_for_memorized} copies at one evaluation): {claim}{check}."
        )
    return " ".join(parts), headline


def first_memorized(copies: np.ndarray, steps: np.ndarray, threshold: int) -> np.ndarray:
    """(P,) first step at which an item has >= threshold copies; NaN if never.

    Args:
        copies: (E, P) copies per evaluation (rows in step order); steps: (E,).
    """
    reached = copies >= threshold
    first = np.where(reached.any(axis=0), steps[np.argmax(reached, axis=0)], np.nan)
    return first.astype(np.float64)


def analyse(run: Path, settings, evals, train01, dataset_index, labels, all_digits, losses) -> dict:
    """Per-example table, metrics table, statistics and verdict (also used to rebuild the report)."""
    import pandas as pd

    from protomem.audit.stats import spearman_test
    from protomem.memorization import near

    evals = sorted(evals, key=lambda e: e["step"])
    steps = np.array([e["step"] for e in evals], dtype=np.int64)
    n = len(train01)
    flat = train01.reshape(n, -1)
    values = flat.shape[1]
    density_train = near.rms(near.mean_knn_distance(flat, k=settings.density_k), values)
    all_flat = all_digits.reshape(len(all_digits), -1)
    dist_all, idx_all = near.nearest_l2(all_flat, flat, k=2 * settings.density_k + 1)
    keep = idx_all != dataset_index[:, None]
    density_full = np.array(
        [near.rms(d[k][: 2 * settings.density_k].mean(), values) for d, k in zip(dist_all, keep, strict=True)]
    )
    # Null: held-out digits (a perfect generalizer's samples) through the same detector.
    held_out = np.setdiff1d(np.arange(len(all_digits)), dataset_index)
    from protomem.audit.core import AuditConfig, audit_images

    null = audit_images(train01, all_digits[held_out], AuditConfig(), density=False).matches
    null_hits = np.bincount(null.loc[null["ratio"], "nearest_train"].to_numpy(), minlength=n)

    table = {
        "train_index": np.arange(n),
        "dataset_index": dataset_index,
        "label": labels,
        "density_train": density_train,
        "density_full": density_full,
        "null_flags": null_hits,
    }
    criteria = {}
    for flag in ("ratio", "l2", "tiled"):
        copies = np.array([e["copies"][flag] for e in evals], dtype=np.int64).reshape(len(evals), n)
        first = first_memorized(copies, steps, settings.copies_for_memorized)
        table[f"first_memorized_{flag}"] = first
        table[f"copies_final_{flag}"] = copies[-1] if len(evals) else np.zeros(n, dtype=np.int64)
        criteria[flag] = {"first": first, "copies": copies}
    for e, step in zip(evals, steps, strict=True):
        table[f"copies_ratio_step{step}"] = np.asarray(e["copies"]["ratio"])
    per_example = pd.DataFrame(table)
    per_example.to_parquet(run / "per_example.parquet", index=False)
    metrics = pd.DataFrame(
        [{k: v for k, v in e.items() if k not in ("copies", "samples", "nearest")} for e in evals]
    )
    metrics.to_parquet(run / "metrics.parquet", index=False)

    censor = float(settings.steps) * 2  # never memorized: later than any step (ties among themselves)
    statistics = {}
    for flag in ("ratio", "l2"):
        first = criteria[flag]["first"]
        time_to = np.where(np.isnan(first), censor, first)
        for score in ("density_train", "density_full"):
            result = spearman_test(per_example[score].to_numpy(), time_to, seed=settings.seed)
            result["n_memorized"] = int(np.isfinite(first).sum())
            statistics[f"{flag}:{score}"] = result
    null_stat = spearman_test(density_train, null_hits.astype(float), seed=settings.seed)
    copy_noise = [e.get("median_d1_copies") for e in evals if e.get("median_d1_copies") is not None]
    sigma = float(np.median(copy_noise)) if copy_noise else 0.03
    bias = detector_bias(train01, sigma, settings.seed)
    bias_stats = {flag: spearman_test(density_train, p, seed=settings.seed) for flag, p in bias.items()}
    per_example["detect_prob_ratio"] = bias["ratio"]
    per_example["detect_prob_l2"] = bias["l2"]
    per_example.to_parquet(run / "per_example.parquet", index=False)
    memorized = int(np.isfinite(criteria["ratio"]["first"]).sum())
    first_step = np.nanmin(criteria["ratio"]["first"]) if memorized else None
    earliest = per_example.sort_values("first_memorized_ratio").head(min(5, memorized))
    verdict, headline = image_verdict(statistics, bias_stats, sigma, n, settings)
    return {
        "modality": "images",
        "preset": asdict(settings),
        "n_train": n,
        "eval_steps": steps.tolist(),
        "n_memorized": memorized,
        "n_memorized_l2": int(np.isfinite(criteria["l2"]["first"]).sum()),
        "first_memorization_step": None if first_step is None else int(first_step),
        "earliest_memorized": [
            {
                "train_index": int(r.train_index),
                "label": int(r.label),
                "step": float(r.first_memorized_ratio),
                "density_train": float(r.density_train),
            }
            for r in earliest.itertuples()
        ],
        "final_fraction_copied": evals[-1]["frac_ratio"] if evals else None,
        "statistics": statistics,
        "null": {
            "held_out_digits": int(len(held_out)),
            "fraction_flagged": float(null["ratio"].mean()),
            "spearman_density_vs_null_flags": null_stat,
        },
        "detector_bias": {
            "copy_noise_rms": sigma,
            "mean_detect_prob": {flag: float(p.mean()) for flag, p in bias.items()},
            "spearman_density_vs_detect_prob": bias_stats,
        },
        "verdict": verdict,
        "headline_criterion": headline,
        "final_loss": float(np.mean(losses[-100:])) if losses else None,
    }


def _recorded_preset(run: Path) -> dict:
    """The preset in run/config.json (a one-line error if the file is not one this study wrote)."""
    from protomem.textio import load_json, require_inside

    path = run / "config.json"
    if not path.exists():
        raise ProtomemError("nothing to resume: not an image-study run directory (no config.json)", path=run)
    doc = load_json(require_inside(run, path), "run config")
    preset = doc.get("preset") if isinstance(doc, dict) else None
    fields = {f for f in ImageStudyPreset.__dataclass_fields__}
    if not isinstance(preset, dict) or set(preset) != fields or not isinstance(preset.get("name"), str):
        raise ProtomemError("not an image-study config (no valid 'preset')", path=path)
    return preset


def rebuild_image_study(out_dir: str | os.PathLike) -> Path:
    """Recompute the analysis, summary.json and report.html of a finished run from its stored files."""
    run = Path(out_dir)
    if not (run / "config.json").exists() or not (run / "evals.json").exists():
        raise ProtomemError("not an image-study run directory (no config.json / evals.json)", path=run)
    recorded = _recorded_preset(run)
    try:
        settings = rebuild_preset(recorded)
    except (TypeError, ValueError) as exc:
        raise ProtomemError(f"not an image-study config ({exc})", path=run / "config.json") from None
    stored = _read_train_images(run)
    _, _, _, all_digits = load_digit_subset(settings.n_train, settings.seed)
    losses = [float(v) for v in _read_checkpoint_state(run)["losses"]]
    from protomem.textio import load_json

    previous = load_json(run / "summary.json", "summary") if (run / "summary.json").exists() else {}
    previous = previous if isinstance(previous, dict) else {}
    config_threads = load_json(run / "config.json", "run config").get("threads")
    summary = analyse(
        run,
        settings,
        _read_evals(run),
        stored["images"],
        stored["dataset_index"],
        stored["labels"],
        all_digits,
        losses,
    )
    summary["seconds"] = previous.get("seconds", float("nan"))
    summary["threads"] = previous.get("threads", config_threads)
    write_image_study_report(run, summary)
    summary["status"] = previous.get("status", "complete")
    write_json_atomic(run / "summary.json", _json_ready(summary))
    return run


def _read_train_images(run: Path) -> dict[str, np.ndarray]:
    """run/train.npz (images (N, H, W, 1), dataset_index (N,), labels (N,)); damage is a one-line error."""
    path = run / "train.npz"
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in ("images", "dataset_index", "labels")}
    except ARRAY_FILE_ERRORS as exc:
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise ProtomemError(f"unreadable training images ({detail})", path=path) from None


def _json_ready(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def rebuild_preset(doc: dict) -> ImageStudyPreset:
    """The preset recorded in a run's config.json."""
    return replace(ImageStudyPreset(doc["name"]), **doc)


# ------------------------------------------------------------------------------------------------- report


def _digit_strip(images: np.ndarray, titles: list[str], title: str):
    """One row of 8x8 digits with a caption under each (a matplotlib figure)."""
    from protomem.htmlreport import subplots

    count = max(1, len(images))
    fig, axes = subplots(1, count, figsize=(1.1 * count + 0.4, 1.6), squeeze=False)
    for ax, image, caption in zip(axes[0], images, titles, strict=False):
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    for ax in axes[0]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return fig


def write_image_study_report(run: Path, summary: dict) -> None:
    """report.html of an image-study run, built from its tables (per_example, metrics, evals.json)."""
    import pandas as pd
    from matplotlib.ticker import NullFormatter

    from protomem.htmlreport import figure_img, render_page, subplots

    per_example = pd.read_parquet(run / "per_example.parquet")
    metrics = pd.read_parquet(run / "metrics.parquet")
    evals = sorted(_read_evals(run), key=lambda e: e["step"])
    train = _read_train_images(run)["images"][..., 0]
    figures = []

    fig, (ax1, ax2) = subplots(1, 2, figsize=(10, 3.2))
    ax1.plot(metrics["step"], metrics["loss"], marker="o")
    ax1.set_xscale("log")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("training loss (mean of last 100 steps)")
    for flag, label in (
        ("frac_ratio", "d1/d2 < 1/3"),
        ("frac_l2", "L2"),
        ("frac_tiled", "tiled L2"),
        ("frac_exact", "exact"),
    ):
        ax2.plot(metrics["step"], metrics[flag], marker="o", label=label)
    ax2.set_xscale("log")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("fraction of samples flagged as copies")
    for ax in (ax1, ax2):
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax2.legend(fontsize=8)
    figures.append(("Training loss and copies among the samples", figure_img(fig, "loss and copy fraction")))

    steps = metrics["step"].to_numpy()
    headline = summary.get("headline_criterion", "ratio")
    first_column = f"first_memorized_{headline}"
    criterion_name = CRITERION_NAMES[headline]
    fig, (ax1, ax2) = subplots(1, 2, figsize=(10, 3.4))
    quartile = pd.qcut(per_example["density_train"], 4, labels=False, duplicates="drop")
    for q in sorted(quartile.unique()):
        first = per_example.loc[quartile == q, first_column].to_numpy()
        alive = [(~(first <= s)).mean() for s in steps]
        name = {0: "Q1 (densest)", 3: "Q4 (most isolated)"}.get(int(q), f"Q{int(q) + 1}")
        ax1.step(steps, alive, where="post", label=name)
    ax1.set_xscale("log")
    ax1.xaxis.set_minor_formatter(NullFormatter())
    ax1.set_xlabel("training step")
    ax1.set_ylabel("fraction not yet memorized")
    ax1.legend(fontsize=8)
    ax1.set_title(f"Survival by density quartile ({criterion_name})")
    never = per_example[first_column].isna()
    ceiling = steps.max() * 1.6 if len(steps) else 1
    ax2.scatter(per_example.loc[~never, "density_train"], per_example.loc[~never, first_column], s=14)
    ax2.scatter(
        per_example.loc[never, "density_train"],
        np.full(never.sum(), ceiling),
        s=14,
        marker="^",
        color="#b33",
        label="never memorized",
    )
    ax2.set_yscale("log")
    ax2.set_xlabel("density: mean RMS distance to the nearest training digits (small = typical)")
    ax2.set_ylabel("first step memorized")
    ax2.legend(fontsize=8)
    figures.append(("Time to memorization against prototypicality", figure_img(fig, "survival and scatter")))

    picks = [evals[i] for i in sorted({0, len(evals) // 2, len(evals) - 1})] if evals else []
    for e in picks:
        samples = np.asarray(e["samples"], dtype=np.float32)[:12] / 255
        nearest = np.asarray(e["nearest"])[:12]
        both = np.concatenate([samples, train[nearest]])
        captions = [f"sample {i}" for i in range(len(samples))] + [f"train {j}" for j in nearest]
        fig = _digit_strip(
            both, captions, f"step {e['step']}: samples (first half) and their nearest training digits"
        )
        figures.append((f"Samples at step {e['step']}", figure_img(fig, f"samples at step {e['step']}")))

    order = per_example.sort_values([first_column, "density_train"], na_position="last")
    first_rows = order.head(8)
    fig = _digit_strip(
        train[first_rows["train_index"]],
        [
            f"step {s:g}\nd={d:.2f}" if np.isfinite(s) else f"never\nd={d:.2f}"
            for s, d in zip(first_rows[first_column], first_rows["density_train"], strict=True)
        ],
        f"memorized first ({criterion_name})",
    )
    figures.append(("The training digits memorized first", figure_img(fig, "first memorized digits")))
    never_rows = per_example[never].sort_values("density_train").tail(8)
    if len(never_rows):
        fig = _digit_strip(
            train[never_rows["train_index"]],
            [f"d={d:.2f}" for d in never_rows["density_train"]],
            "never memorized (up to 8, most isolated last)",
        )
        figures.append(("Training digits never memorized", figure_img(fig, "never memorized digits")))
    import protomem

    render_page(
        "image_study.html.j2",
        run / "report.html",
        summary=summary,
        figures=figures,
        protomem_version=getattr(protomem, "__version__", ""),
    )
