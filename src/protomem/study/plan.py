"""How long a study (or a sweep) will take, estimated before running it: ``protomem study --plan``.

For every distinct model of the conditions, a few training steps and sampler steps are timed on this
machine (:func:`protomem.diffusion.cost.measure_step_cost`, which also counts their FLOPs), and the
evaluation bookkeeping (classifying a batch of samples, writing its table) is timed once per grammar
size. The likelihood endpoint's forwards (``likelihood_draws`` x (P + held-out strings) per evaluation)
cost a sampler step each. A condition then costs::

    train   = steps * seconds per training step
    evals   = n_evals * ((K * sampler steps + likelihood forwards) * seconds per sequence-step
                         + bookkeeping)
    finer   = K * finer sampler steps * seconds per sequence-step + bookkeeping
    other   = CONDITION_OVERHEAD_SECONDS (setup, analysis, report)

Conditions run ``jobs`` at a time, each starting when a worker frees, in the order the study's runner
submits them: longest first by counted FLOPs (:func:`submission_order`, the same function the runner
uses; nothing timed decides it); the study's wall time is that schedule's makespan plus
STUDY_OVERHEAD_SECONDS. On a loaded CPU the timings are scaled by
how much more the study's own processes will compete for the cores than the single timing process did
(from the load average before timing). On an accelerator, conditions sharing it are added up.

The fixed allowances were measured on this project's 2-core machine (quick and default presets: setup,
analysis and report took 5-14 s per condition, start-up and the study report 10-15 s); they are
small next to training for any preset but ``quick``.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protomem.diffusion.device import DEFAULT_GPU_TFLOPS
from protomem.study.config import ConditionConfig

CONDITION_OVERHEAD_SECONDS = 8.0
STUDY_OVERHEAD_SECONDS = 12.0
SAMPLE_BATCH = 512  # sequences per sampling batch (protomem.diffusion.generate's default)

# DiffusionConfig fields that do not change what one training or sampler step costs.
COST_FREE_FIELDS = frozenset(
    {
        "seed",
        "steps",
        "lr",
        "weight_decay",
        "warmup_steps",
        "lr_schedule",
        "eval_steps",
        "n_evals",
        "eval_samples",
        "sampling_steps",
        "checkpoint_every",
        "log_every",
        "timesteps",
        "schedule",
        "ce_weight",
        "threads",
    }
)


@dataclass
class ConditionEstimate:
    """One condition's work and its estimated wall seconds (one worker, this machine).

    Attributes:
        name: the condition.
        steps, n_evals, n_samples, sampling_steps, finer_sampling_steps, n_train: its work.
        likelihood_forwards: denoiser forwards of one sequence per evaluation for the likelihood endpoint.
        n_parameters: parameters of its denoiser.
        train_flops: FLOPs of one training step; sample_flops: of one sampler step of one sequence.
        step_seconds: timed seconds of one training step; sample_seconds: of one sequence-step.
        bookkeeping_seconds: timed classification and table writing of one evaluation's samples.
        train_seconds, eval_seconds, finer_seconds, other_seconds: the estimate's parts (load-scaled).
    """

    name: str
    steps: int
    n_evals: int
    n_samples: int
    sampling_steps: int
    finer_sampling_steps: int
    n_train: int
    likelihood_forwards: int
    n_parameters: int
    train_flops: float
    sample_flops: float
    step_seconds: float
    sample_seconds: float
    bookkeeping_seconds: float
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    finer_seconds: float = 0.0
    other_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.eval_seconds + self.finer_seconds + self.other_seconds

    @property
    def total_flops(self) -> float:
        """Training plus sampling FLOPs of the whole condition."""
        sequence_steps = self.n_samples * (self.n_evals * self.sampling_steps + self.finer_sampling_steps)
        sequence_steps += self.n_evals * self.likelihood_forwards
        return self.steps * self.train_flops + sequence_steps * self.sample_flops

    @classmethod
    def of(cls, name: str, condition: ConditionConfig, counts: Any, **timings: float) -> ConditionEstimate:
        """The estimate of ``condition``'s work with step ``counts`` (a StepCost or StepFlops) and the
        timed seconds in ``timings`` (step_seconds, sample_seconds, bookkeeping_seconds; default 0)."""
        config = condition.diffusion_config()
        return cls(
            name=name,
            steps=config.steps,
            n_evals=len(config.resolved_eval_steps()),
            n_samples=condition.evaluation.n_samples,
            sampling_steps=config.resolved_sampling_steps(),
            finer_sampling_steps=condition.finer_sampling_steps(),
            n_train=condition.data.n_train,
            likelihood_forwards=likelihood_forwards(condition),
            n_parameters=counts.n_parameters,
            train_flops=counts.train_flops,
            sample_flops=counts.sample_flops,
            step_seconds=timings.get("step_seconds", 0.0),
            sample_seconds=timings.get("sample_seconds", 0.0),
            bookkeeping_seconds=timings.get("bookkeeping_seconds", 0.0),
        )


@dataclass
class StudyPlan:
    """The estimate of a whole study.

    Attributes:
        conditions: per-condition estimates, in the order given (the preset's).
        order: the conditions' names in the order they start (the runner's submission order).
        jobs: conditions at once; threads: torch threads per condition.
        device: the device timed on (resolved); device_label: its hardware.
        load_average: 1-minute load average before timing; load_factor: the slow-down applied for it.
        wall_seconds: estimated wall time of the study on this machine.
        timing_seconds: how long the timing itself took.
    """

    conditions: list[ConditionEstimate]
    jobs: int
    threads: int
    device: str
    device_label: str
    load_average: float
    load_factor: float
    wall_seconds: float
    timing_seconds: float
    order: list[str] = field(default_factory=list)
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def total_flops(self) -> float:
        return sum(c.total_flops for c in self.conditions)

    def gpu_hours(self, tflops: float = DEFAULT_GPU_TFLOPS) -> float:
        """GPU-hours of the counted FLOPs at a sustained ``tflops`` TFLOP/s."""
        return self.total_flops / (tflops * 1e12) / 3600.0


def longest_first(costs: Sequence[float]) -> list[int]:
    """Indices of ``costs`` from the largest to the smallest; equal costs keep their order."""
    return sorted(range(len(costs)), key=lambda i: -costs[i])


def submission_order(conditions: Sequence[ConditionConfig]) -> list[int]:
    """The order in which the study's parallel runner starts ``conditions`` (indices into them): longest
    first by the counted FLOPs of training plus evaluation sampling (:attr:`ConditionEstimate.total_flops`,
    counted on the CPU with one real step per distinct model, nothing timed), ties in the given order.
    Starting the long ones first shortens the schedule when conditions differ in size (the default
    preset's deep grammar costs twice its small one)."""
    from protomem.diffusion.cost import count_step_flops

    counts: dict[tuple, Any] = {}
    flops = []
    for condition in conditions:
        key = cost_key(condition)
        if key not in counts:
            batch = min(SAMPLE_BATCH, condition.evaluation.n_samples)
            counts[key] = count_step_flops(condition.diffusion_config(), sample_batch=batch)
        flops.append(ConditionEstimate.of(condition.name, condition, counts[key]).total_flops)
    return longest_first(flops)


def makespan(durations: Sequence[float], jobs: int) -> float:
    """Wall time of running ``durations`` in order on ``jobs`` workers, each task to the first free one."""
    workers = [0.0] * max(1, jobs)
    for duration in durations:
        index = min(range(len(workers)), key=workers.__getitem__)
        workers[index] += duration
    return max(workers, default=0.0)


def load_factor(load: float, cores: int, threads: int, jobs: int) -> float:
    """Slow-down of the study's threads relative to the timing's, on ``cores`` cores already running
    ``load`` threads: a thread's share of a core is min(1, cores / runnable threads)."""

    def share(ours: int) -> float:
        return min(1.0, cores / max(load + ours, 1e-9))

    return share(threads) / share(jobs * threads)


def cost_key(config: ConditionConfig) -> tuple:
    """What one step's cost depends on: the diffusion config without COST_FREE_FIELDS."""
    fields = config.diffusion_config().model_dump()
    return tuple(sorted((k, repr(v)) for k, v in fields.items() if k not in COST_FREE_FIELDS))


def likelihood_forwards(config: ConditionConfig) -> int:
    """Sequence forwards of one evaluation's likelihood endpoint: draws x (P + held-out strings)."""
    evaluation = config.evaluation
    heldout = evaluation.heldout_strings or config.data.n_train
    return evaluation.likelihood_draws * (config.data.n_train + heldout) if evaluation.likelihood_draws else 0


def _bookkeeping_seconds(config: ConditionConfig) -> float:
    """Seconds to classify one evaluation's K samples against the training set and write their table."""
    from protomem.grammar import sample_distinct_strings, sample_strings
    from protomem.memorization.hierarchy import classify_samples
    from protomem.study.pipeline import _samples_columns, build_grammar, write_table

    grammar = build_grammar(config)
    data = sample_distinct_strings(grammar, config.data.n_train, seed=config.data.seed)
    samples = sample_strings(grammar, config.evaluation.n_samples, seed=0).tokens
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):  # the first call also pays for imports and caches: keep the faster
            start = time.perf_counter()
            result = classify_samples(grammar, data.tokens, samples)
            write_table(Path(tmp) / "step.parquet", _samples_columns(1, "train", samples, result))
            times.append(time.perf_counter() - start)
    return min(times)


def plan_conditions(
    conditions: Sequence[ConditionConfig],
    *,
    jobs: int,
    threads: int,
    timed_steps: int = 3,
    names: Sequence[str] | None = None,
    on_measure: Callable[[str], Any] | None = None,
    longest_first_order: bool = True,
) -> StudyPlan:
    """Estimate the wall time of running ``conditions`` ``jobs`` at a time with ``threads`` torch threads
    each, on the device each condition names (timed here). Takes a few training and sampler steps of each
    distinct model, plus warm-up. ``names`` label the rows (default: the conditions' names);
    ``on_measure(message)`` is called before each timing. The schedule starts the conditions as the
    study's runner does: with more than one job longest first by counted FLOPs (:func:`submission_order`),
    else (or with ``longest_first_order=False``, a sweep's points) in the given order."""
    import torch

    from protomem.diffusion.cost import measure_step_cost
    from protomem.diffusion.device import device_label, resolve_device

    started = time.perf_counter()
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    costs: dict[tuple, Any] = {}
    bookkeeping: dict[tuple, float] = {}
    estimates = []
    devices = set()
    try:
        labels = list(names) if names is not None else [c.name for c in conditions]
        for label, condition in zip(labels, conditions, strict=True):
            config = condition.diffusion_config()
            device = resolve_device(config.device)
            devices.add(device)
            key = cost_key(condition)
            if key not in costs:
                if on_measure is not None:
                    on_measure(f"timing {label}'s model ({config.model}, width {config.width})")
                batch = min(SAMPLE_BATCH, condition.evaluation.n_samples)
                costs[key] = measure_step_cost(
                    config, sample_batch=batch, timed_steps=timed_steps, device=device
                )
            g = condition.grammar
            book_key = (g.vocab_size, g.n_classes, g.rules_per_symbol, g.branching, g.depth)
            book_key += (condition.data.n_train, condition.evaluation.n_samples)
            if book_key not in bookkeeping:
                bookkeeping[book_key] = _bookkeeping_seconds(condition)
            cost = costs[key]
            estimates.append(
                ConditionEstimate.of(
                    label,
                    condition,
                    cost,
                    step_seconds=cost.train_seconds,
                    sample_seconds=cost.sample_seconds,
                    bookkeeping_seconds=bookkeeping[book_key],
                )
            )
    finally:
        torch.set_num_threads(previous_threads)
    on_cpu = all(d.type == "cpu" for d in devices)
    factor = load_factor(load, cores, threads, jobs) if on_cpu else 1.0
    for e in estimates:
        e.train_seconds = factor * e.steps * e.step_seconds
        sequence_steps = e.n_samples * e.sampling_steps + e.likelihood_forwards
        per_eval = sequence_steps * e.sample_seconds + e.bookkeeping_seconds
        e.eval_seconds = factor * e.n_evals * per_eval
        finer = e.n_samples * e.finer_sampling_steps * e.sample_seconds + e.bookkeeping_seconds
        e.finer_seconds = factor * finer
        e.other_seconds = factor * CONDITION_OVERHEAD_SECONDS
    # the runner's order: by the same counts (FLOPs do not depend on the device they are counted on)
    reorder = longest_first_order and jobs > 1  # one job runs the conditions as listed
    order = longest_first([e.total_flops for e in estimates]) if reorder else list(range(len(estimates)))
    durations = [estimates[i].seconds for i in order]
    # on an accelerator the conditions share it: their device work adds up rather than overlaps
    wall = makespan(durations, jobs) if on_cpu else sum(durations)
    device = sorted(devices, key=str)[0] if devices else resolve_device("cpu")
    return StudyPlan(
        conditions=estimates,
        jobs=jobs,
        threads=threads,
        device=", ".join(sorted(str(d) for d in devices)) or "cpu",
        device_label=device_label(device),
        load_average=load,
        load_factor=factor,
        wall_seconds=wall + STUDY_OVERHEAD_SECONDS,
        timing_seconds=time.perf_counter() - started,
        order=[estimates[i].name for i in order],
        cores=cores,
    )


def format_duration(seconds: float) -> str:
    """'42 s', '7 min 5 s', '3 h 12 min', '9.4 days'."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {seconds % 60:.0f} s"
    if seconds < 2 * 86400:
        return f"{int(seconds // 3600)} h {(seconds % 3600) / 60:.0f} min"
    return f"{seconds / 86400:.1f} days"


def plan_table(plan: StudyPlan, title: str) -> Any:
    """The per-condition rows of ``plan`` as a rich Table."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in (
        "condition",
        "P",
        "steps",
        "evals x K",
        "sampler steps",
        "params",
        "GFLOP/train step",
        "MFLOP/seq-step",
        "s/train step",
        "train",
        "evals",
        "finer",
        "other",
        "total",
    ):
        table.add_column(column, justify="left" if column == "condition" else "right", overflow="fold")
    for e in plan.conditions:
        table.add_row(
            e.name,
            f"{e.n_train:,}",
            f"{e.steps:,}",
            f"{e.n_evals} x {e.n_samples:,}",
            f"{e.sampling_steps} / {e.finer_sampling_steps}",
            f"{e.n_parameters:,}",
            f"{e.train_flops / 1e9:,.2f}",
            f"{e.sample_flops / 1e6:,.2f}",
            f"{e.step_seconds:.3g}",
            format_duration(e.train_seconds),
            format_duration(e.eval_seconds),
            format_duration(e.finer_seconds),
            format_duration(e.other_seconds),
            format_duration(e.seconds),
        )
    return table


def plan_summary(plan: StudyPlan, gpu_tflops: float = DEFAULT_GPU_TFLOPS) -> list[str]:
    """The lines under the table: wall time here, how it was measured, GPU-hours at ``gpu_tflops``."""
    listed = plan.order == [e.name for e in plan.conditions]
    parallel = (
        f"{plan.jobs} condition(s) at a time, {plan.threads} torch thread(s) each, started "
        + ("in the order listed" if listed else "longest first by FLOPs: " + ", ".join(plan.order))
        if plan.device == "cpu"
        else f"conditions sharing {plan.device}, their times added up"
    )
    train_flops = sum(e.steps * e.train_flops for e in plan.conditions)
    total = plan.total_flops
    achieved = sum(e.train_flops / e.step_seconds for e in plan.conditions) / max(len(plan.conditions), 1)
    lines = [
        f"estimated wall time on this machine: {format_duration(plan.wall_seconds)} "
        f"({parallel}; {plan.device_label})",
        f"timed here: {len({(e.train_flops, e.step_seconds) for e in plan.conditions})} distinct model(s), "
        f"a few training and sampler steps each after warm-up ({plan.timing_seconds:.0f} s); "
        f"load average {plan.load_average:.2f} on {plan.cores} cores before timing, "
        f"times scaled by {plan.load_factor:.2f} for the study's own processes; "
        f"mean training throughput {achieved / 1e9:.1f} GFLOP/s per condition",
        f"compute: {total / 1e12:,.1f} TFLOP ({train_flops / max(total, 1e-9):.0%} training, the rest "
        "sampling; matrix products as torch's FlopCounterMode counts them)",
        f"on a GPU: {plan.gpu_hours(gpu_tflops):,.3g} GPU-hours at {gpu_tflops:g} TFLOP/s sustained "
        "(an assumption, --gpu-tflops; measure yours with benchmarks/bench_device.py), plus evaluation "
        "bookkeeping and analysis on the CPU",
    ]
    return lines
