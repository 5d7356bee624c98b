"""The whole study: every condition of a preset, then a pooled verdict and the study report.

Layout of a study directory::

    study.json               preset, conditions, threads, load average, pooled numbers, verdict, status
    conditions/<name>/       one run_condition directory per condition
    report.html              pooled verdict, per-condition table, forest plot, survival curves, links

The pooled statistic of a group of conditions is the mean of their Spearman rho (primary score vs
earliness of first memorization); its null distribution averages draw r of every condition's Monte Carlo
null (the draws are independent across conditions), and the p-value is the upper tail fraction.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protomem.diffusion.device import device_label, resolve_device
from protomem.errors import ProtomemError
from protomem.io import is_non_empty_dir, start_fresh_run_dir, write_json_atomic
from protomem.study import stats
from protomem.study.analysis import beyond_likelihood_name, verdict_lead
from protomem.study.claims import pooled_claim, skew_claim
from protomem.study.config import ConditionConfig, apply_overrides
from protomem.study.pipeline import is_complete, read_summary, run_condition
from protomem.study.plan import submission_order
from protomem.study.power import power_curve
from protomem.study.presets import PRESETS, get_preset
from protomem.study.report import STUDY_FILE, render_study_report
from protomem.study.skew import tau_mem, tau_ratios
from protomem.textio import load_json, require_inside


def grammar_label(condition: ConditionConfig) -> str:
    """'v=8, m=3, L=3': which grammar shape a condition uses."""
    g = condition.grammar
    return f"v={g.vocab_size}, m={g.rules_per_symbol}, L={g.depth}"


def _groups(conditions: list[ConditionConfig]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {"all conditions": [c.name for c in conditions]}
    by_size = {}
    for c in conditions:
        by_size.setdefault(grammar_label(c), []).append(c.name)
    if len(by_size) > 1:
        groups.update({f"grammar {k}": v for k, v in by_size.items()})
    zipf = [c.name for c in conditions if c.grammar.zipf_exponent > 0]
    uniform = [c.name for c in conditions if c.grammar.zipf_exponent == 0]
    if zipf and uniform:
        groups["Zipf rules"] = zipf
        groups["uniform rules"] = uniform
    return groups


def condition_statistic(summary: dict[str, Any], score: str, endpoint: str = "copies") -> float:
    """A condition's observed statistic: rho of ``score`` for the copy or likelihood endpoint, or the mean
    slop slope of its window (endpoint "slop"); NaN when the condition does not have it."""
    nan = float("nan")
    if endpoint == "slop":
        test = (summary.get("slop") or {}).get("test") or {}
        return float(test.get("slope", nan))
    section = summary if endpoint == "copies" else (summary.get("likelihood") or {})
    correlations = section.get("correlations")
    value = ((correlations or {}).get(score) or {}).get("rho", nan)
    return float(value) if value is not None else nan


def pooled_statistics(
    study_dir: Path, names: list[str], score: str, endpoint: str = "copies"
) -> dict[str, float]:
    """Mean statistic over the named conditions (those that have it) and its Monte Carlo p against each
    pooled null (upper tail; ``p_lower_*`` the lower tail). The pooled null averages draw r of every
    condition's null (the draws are independent across conditions)."""
    values, draws = [], {"grammar": [], "calibrated": []}
    for name in names:
        condition_dir = study_dir / "conditions" / name
        value = condition_statistic(read_summary(condition_dir) or {}, score, endpoint)
        if np.isnan(value):
            continue
        values.append(value)
        nulls = pd.read_parquet(condition_dir / "nulls.parquet")
        if "endpoint" in nulls.columns:  # tables written before the likelihood endpoint hold copies only
            nulls = nulls[nulls["endpoint"] == endpoint]
        elif endpoint != "copies":
            nulls = nulls.iloc[:0]
        for null in draws:
            part = nulls[(nulls["score"] == score) & (nulls["null"] == null)].sort_values("draw")
            draws[null].append(part["rho"].to_numpy())
    nan = float("nan")
    out: dict[str, float] = {
        "rho": float(np.mean(values)) if values else nan,
        "n_conditions": len(values),
    }
    for null, arrays in draws.items():
        length = min((len(a) for a in arrays), default=0)
        if length == 0:
            out[f"null_mean_{null}"], out[f"p_{null}"], out[f"p_lower_{null}"] = nan, nan, nan
            continue
        pooled = np.nanmean(np.stack([a[:length] for a in arrays]), axis=0)
        out[f"null_mean_{null}"] = float(np.nanmean(pooled))
        out[f"p_{null}"] = stats.tail_p(out["rho"], pooled)
        out[f"p_lower_{null}"] = stats.tail_p(-out["rho"], -pooled)
    return out


def study_verdict(pooled: dict[str, dict[str, float]], score: str, alpha: float) -> str:
    """One sentence with the pooled numbers (and the confound-free large-grammar group when present)."""
    main = pooled["all conditions"]
    numbers = (
        f"mean Spearman rho({score}, earliness of first memorization) over {main['n_conditions']} conditions "
        f"= {main['rho']:+.2f}, Monte Carlo p = {main['p_calibrated']:.3g} against the calibrated null "
        f"(null mean {main['null_mean_calibrated']:+.2f}) and p = {main['p_grammar']:.3g} "
        f"against the grammar null (null mean {main['null_mean_grammar']:+.2f})"
    )
    if np.isnan(main["rho"]):
        return f"The study could not measure the effect ({numbers})."
    return f"{verdict_lead(main['p_calibrated'], main['p_grammar'], alpha)}: {numbers}."


STUDY_FORMAT = "protomem.study/1"


def _prepare(out_dir: Path, preset: str, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    if not resume:
        start_fresh_run_dir(out_dir, overwrite)
        return None
    if not is_non_empty_dir(out_dir) or not (out_dir / STUDY_FILE).exists():
        raise ProtomemError("nothing to resume: not a study run directory (no study.json)", path=out_dir)
    return read_study_record(out_dir)


def read_study_record(out_dir: Path) -> dict[str, Any]:
    """study.json of a study to resume, refused unless it is one ``run_study`` wrote: a mapping with a
    known preset, that preset's conditions, and thread / job counts that are positive integers or null."""
    path = require_inside(out_dir, out_dir / STUDY_FILE)
    doc = load_json(path, "study record")

    def refuse(what: str) -> ProtomemError:
        return ProtomemError(f"not a study record written by protomem ({what}); nothing resumed", path=path)

    if not isinstance(doc, dict):
        raise refuse("expected a JSON object")
    if doc.get("format", STUDY_FORMAT) != STUDY_FORMAT:
        raise refuse(f"format {doc.get('format')!r}")
    preset = doc.get("preset")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise refuse(f"unknown preset {preset!r}")
    if doc.get("conditions") != [c.name for c in get_preset(preset).conditions]:
        raise refuse(f"its conditions are not those of the {preset!r} preset")
    for field in ("threads", "jobs"):
        value = doc.get(field)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise refuse(f"{field} {value!r}")
    return doc


def _watch_parent(parent: int) -> None:
    """Worker initializer: end this worker when the study process ``parent`` dies (e.g. killed), so that
    a resumed study never runs beside an orphan writing into the same condition directory.

    The parent's pid is passed in, not read here: a parent killed while the worker was still starting
    would otherwise be missed (the worker would take its new parent, init, for the study).
    """
    import threading

    if os.getppid() != parent:
        os._exit(1)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def _run_one(config: ConditionConfig, condition_dir: str) -> str:
    """Worker: one condition, quietly (the parent shows progress); resumes whatever is there."""
    import torch

    torch.set_num_threads(int(config.diffusion.threads or 1))
    path = Path(condition_dir)
    run_condition(config, path, resume=path.exists(), progress=False)
    return config.name


def _condition_step(condition_dir: Path) -> int:
    """The last evaluation step a condition has reached (from its trainer's checkpoint marker)."""
    from protomem.diffusion.checkpoint import latest_step

    try:
        return latest_step(condition_dir / "train") or 0
    except ProtomemError:
        return 0


def _run_parallel(conditions: list[ConditionConfig], out_dir: Path, jobs: int, progress: bool) -> None:
    """Run conditions in ``jobs`` worker processes, submitted longest first by counted FLOPs
    (protomem.study.plan.submission_order: the schedule ``--plan`` simulates); each condition's results
    do not depend on when it runs. Progress per condition polled from its checkpoints, shown in the
    given order."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    context = multiprocessing.get_context("spawn")
    dirs = {c.name: out_dir / "conditions" / c.name for c in conditions}
    ordered = [conditions[i] for i in submission_order(conditions)]  # counted before any worker starts
    with (
        ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=_watch_parent, initargs=(os.getpid(),)
        ) as pool,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:>6.0f}/{task.total:.0f} steps"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not progress,
        ) as bars,
    ):
        tasks = {c.name: bars.add_task(c.name, total=c.diffusion.steps) for c in conditions}
        overall = bars.add_task("all conditions", total=sum(c.diffusion.steps for c in conditions))
        futures = {pool.submit(_run_one, c, str(dirs[c.name])): c.name for c in ordered}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()  # re-raise a worker's error here
                name = futures[future]
                bars.update(tasks[name], completed=bars.tasks[tasks[name]].total, description=f"{name} done")
            total = 0
            for c in conditions:
                step = (
                    bars.tasks[tasks[c.name]].total
                    if is_complete(dirs[c.name])
                    else _condition_step(dirs[c.name])
                )
                bars.update(tasks[c.name], completed=step)
                total += step
            bars.update(overall, completed=total)


def parallel_settings(n_conditions: int, threads: int | None, jobs: int | None) -> tuple[int | None, int]:
    """(threads per condition, conditions at once) of a study: jobs default cores // threads, at most
    the number of conditions; with more than one job, one thread each unless asked otherwise. threads
    None (only with one job) means: probe."""
    cores = os.cpu_count() or 1
    if jobs is None:
        jobs = max(1, cores // (threads or 1))
    jobs = max(1, min(jobs, n_conditions))
    if threads is None and jobs > 1:
        threads = 1
    return threads, jobs


def with_device(conditions: list[ConditionConfig], device: str | None) -> list[ConditionConfig]:
    """The conditions with ``diffusion.device`` set to ``device`` (unchanged when None)."""
    if device is None:
        return list(conditions)
    return [apply_overrides(c, {"diffusion.device": device}) for c in conditions]


def run_study(
    out_dir: str | Path,
    *,
    preset: str = "default",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
    jobs: int | None = None,
    device: str | None = None,
) -> Path:
    """Run every condition of ``preset`` into ``out_dir/conditions/`` and write the pooled verdict and report.

    Args:
        resume: continue a killed study (finished conditions are kept, the others resume).
        overwrite: replace a non-empty ``out_dir``.
        threads: torch threads per condition. None: one thread per condition with conditions run in
            parallel on the cores (small models run faster that way than two threads on one), or with
            ``jobs=1`` probe 1 vs all cores once (first condition) and reuse the choice.
        jobs: conditions run at the same time (processes); None = cores // threads.
        device: ``auto | cpu | cuda | cuda:N | mps`` for every condition (None: the preset's, ``auto``);
            checked here, before any work. Conditions run in parallel share the device.
    """
    out_dir = Path(out_dir)
    if device is not None:
        resolve_device(device)  # a device this machine lacks fails now, before any work or worker
    saved = _prepare(out_dir, preset, resume, overwrite)
    if saved is not None:
        preset = saved["preset"]
        threads = threads or saved.get("threads")
        jobs = jobs or saved.get("jobs")
        device = device or saved.get("device")
    conditions = with_device(get_preset(preset).conditions, device)
    resolved = resolve_device(conditions[0].diffusion.device)
    cores = os.cpu_count() or 1
    threads, jobs = parallel_settings(len(conditions), threads, jobs)
    clock = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    doc: dict[str, Any] = {
        "format": STUDY_FORMAT,
        "preset": preset,
        "conditions": [c.name for c in conditions],
        "primary_score": conditions[0].analysis.primary_score,
        "alpha": conditions[0].analysis.alpha,
        "threads": threads,
        "jobs": jobs,
        "device": device,
        "device_resolved": str(resolved),
        "device_label": device_label(resolved),
        "threads_policy": (
            "probe 1 vs all cores (first condition), reused"
            if threads is None
            else f"{threads} torch thread(s) per condition, {jobs} condition(s) at a time on {cores} cores"
        ),
        "load_average": [round(x, 2) for x in load],
        "status": "running",
    }
    write_json_atomic(out_dir / STUDY_FILE, doc)
    if threads is not None:
        conditions = [apply_overrides(c, {"diffusion.threads": int(threads)}) for c in conditions]
    if jobs > 1:
        _run_parallel(conditions, out_dir, jobs, progress)
    else:
        for index, condition in enumerate(conditions):
            condition_dir = out_dir / "conditions" / condition.name
            if threads is not None:
                condition = apply_overrides(condition, {"diffusion.threads": int(threads)})
            if progress:
                from rich.console import Console

                Console(stderr=True).rule(f"condition {index + 1}/{len(conditions)}: {condition.name}")
            run_condition(condition, condition_dir, resume=condition_dir.exists(), progress=progress)
            if threads is None:
                threads = int((read_summary(condition_dir) or {}).get("threads") or 1)
                doc["threads"] = threads
                doc["threads_policy"] += f": {threads}"
                write_json_atomic(out_dir / STUDY_FILE, doc)
    groups = _groups(conditions)
    pooled = {
        name: pooled_statistics(out_dir, members, doc["primary_score"]) for name, members in groups.items()
    }
    doc["pooled_groups"] = pooled
    doc["pooled"] = pooled["all conditions"]
    doc["verdict"] = study_verdict(pooled, doc["primary_score"], doc["alpha"])
    # exploratory, not part of the verdict: the primary score with log p(x) held out, pooled over the
    # conditions where it exists (those whose log p(x) varies, i.e. not uniform rules)
    held_out = beyond_likelihood_name(doc["primary_score"])
    with_score = [
        c.name
        for c in conditions
        if held_out in (read_summary(out_dir / "conditions" / c.name) or {}).get("correlations", {})
    ]
    doc["pooled_beyond_likelihood"] = (
        {"score": held_out, "conditions": with_score, **pooled_statistics(out_dir, with_score, held_out)}
        if with_score
        else None
    )
    doc.update(claims_and_power(out_dir, conditions, doc["primary_score"], doc["alpha"]))
    doc["seconds"] = time.perf_counter() - clock  # of the invocation that finished the study
    write_json_atomic(out_dir / STUDY_FILE, doc)
    render_study_report(out_dir)
    doc["status"] = "complete"
    write_json_atomic(out_dir / STUDY_FILE, doc)
    return out_dir


def claims_and_power(
    out_dir: Path, conditions: list[ConditionConfig], primary_score: str, alpha: float
) -> dict[str, Any]:
    """The claims table (protomem.study.claims), the pooled tests behind it and the power curves.

    Claim (a) is tested on the Zipf conditions: with the primary score when all of them have a matched
    training set (score and log p(x) decorrelated by design), else with the primary score with log p(x)
    held out (its rank residual). Claim (c) pools every condition with a partial-memorization window.
    Claim (b) needs conditions of several skew arms (protomem.study.skew).
    """
    zipf = [c for c in conditions if c.grammar.zipf_exponent > 0]
    matched = bool(zipf) and all(c.data.design == "matched" for c in zipf)
    score = primary_score if matched else beyond_likelihood_name(primary_score)
    names = [c.name for c in zipf]
    design = "a matched training set" if matched else "log p(x) held out of the score (rank residual)"
    pooled_tests = {
        "a_copies": pooled_statistics(out_dir, names, score, "copies"),
        "a_likelihood": pooled_statistics(out_dir, names, score, "likelihood"),
        "c": pooled_statistics(out_dir, [c.name for c in conditions], "slop_slope", "slop"),
    }

    def earliness_test(count: int, level: float) -> str:
        return (
            f"Spearman rho({score}, earliness of first memorization) pooled over {count} Zipf conditions "
            f"with {design}, one-sided against the grammar and the calibrated Monte Carlo nulls, "
            f"alpha {level:g}"
        )

    claims = [
        pooled_claim("a", earliness_test(len(names), alpha), "copies", pooled_tests["a_copies"], alpha),
        pooled_claim(
            "a", earliness_test(len(names), alpha), "likelihood", pooled_tests["a_likelihood"], alpha
        ),
    ]
    taus = {}
    for condition in conditions:
        metrics_path = out_dir / "conditions" / condition.name / "metrics.parquet"
        if metrics_path.is_file():
            metrics = pd.read_parquet(metrics_path, columns=["step", "frac_exact_copy"])
            taus[condition.name] = tau_mem(metrics["step"].to_numpy(), metrics["frac_exact_copy"].to_numpy())
    ratios = tau_ratios(taus, conditions)
    claims.append(skew_claim(ratios or None, alpha))
    claims.append(
        pooled_claim(
            "c",
            "mean slop slope (log over-production on log training frequency, levels below the root, "
            "checkpoints before exact copies reach 5%) pooled over the conditions, one-sided against a "
            f"grammar sampler and a calibrated (sharpened-grammar) null, alpha {alpha}",
            "slop",
            pooled_tests["c"],
            alpha,
        )
    )
    # claim (a) by grammar when the preset has several: secondary, alpha shared among the grammars
    by_grammar: dict[str, list[str]] = {}
    for c in zipf:
        by_grammar.setdefault(grammar_label(c), []).append(c.name)
    if len(by_grammar) > 1:
        level = alpha / len(by_grammar)
        for label, members in by_grammar.items():
            for endpoint in ("copies", "likelihood"):
                pooled = pooled_statistics(out_dir, members, score, endpoint)
                pooled_tests[f"a_{endpoint}_{label}"] = pooled
                test = earliness_test(len(members), level) + f" (grammar {label})"
                claims.append(
                    pooled_claim("a", test, endpoint, pooled, level, f"grammar {label}", "secondary")
                )
    summaries = [read_summary(out_dir / "conditions" / name) or {} for name in names]
    correlations = {
        "copies": [(summary.get("correlations") or {}).get(score, {}) for summary in summaries],
        "likelihood": [
            ((s.get("likelihood") or {}).get("correlations") or {}).get(score, {}) for s in summaries
        ],
    }
    power = {endpoint: power_curve(values, alpha=alpha) for endpoint, values in correlations.items()}
    return {
        "claims": claims,
        "claims_score": score,
        "pooled_tests": pooled_tests,
        "power": {"score": score, **power},
        "skew": {"tau_mem": taus, "ratios": ratios} if ratios else None,
    }


def summary_paragraph(study_dir: Path) -> str:
    """The one-paragraph summary printed at the end of ``protomem study``."""
    doc = json.loads((Path(study_dir) / STUDY_FILE).read_text())
    parts = [
        f"Study ({doc['preset']} preset, {len(doc['conditions'])} conditions, {doc['seconds']:.0f} s, "
        f"{doc['threads']} torch thread(s), {doc.get('device_resolved', 'cpu')}). {doc['verdict']}"
    ]
    for name in doc["conditions"]:
        summary = read_summary(Path(study_dir) / "conditions" / name) or {}
        primary = summary.get("primary", {})
        parts.append(
            f"{name}: rho = {primary.get('rho', float('nan')):+.2f} "
            f"(p_cal = {primary.get('p_calibrated', float('nan')):.2g}), "
            f"{summary.get('frac_memorized_final', float('nan')):.0%} of training strings memorized, "
            f"training mass {summary.get('train_mass', float('nan')):.2g}."
        )
    for claim in doc.get("claims") or []:
        statistic = claim.get("statistic")
        shown = f"{statistic:+.3f}" if isinstance(statistic, float) else "see the report"
        parts.append(f"Claim ({claim['claim']}, {claim['endpoint']}): {claim['verdict']} ({shown}).")
    parts.append(f"Report: {Path(study_dir) / 'report.html'}")
    return " ".join(parts)
