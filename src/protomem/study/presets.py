"""The study's presets: lists of conditions sized for a first look, the default run, and the paper's scale.

- ``quick`` (< 1 minute): one small-grammar Zipf condition, small sample counts (tests, a first look).
- ``default`` (<= 5 minutes on 2 CPU cores): the large grammar (v=16, m=4, s=2, L=4: ~1.7e10 strings, the
  training set holds a negligible share of the probability mass, so a copy cannot be a lucky grammatical
  sample) and the small grammar (v=8, m=3, L=3: 17,496 strings, where the nulls do the work), each with
  Zipf rules (exponent 1) and with uniform rules (the control), two seeds for the Zipf conditions.
- ``generalize-first`` (about 8 minutes): the small grammar with P = 256 training strings, the
  regime of the paper, where the model produces novel valid strings hundreds of steps before it copies
  (the scaling sweep's onsets: tau_gen ~ 55 steps, tau_mem ~ 900 at this P), trained until most
  training strings are memorized; Zipf rules with four seeds, uniform rules (the control) with two.
- ``generalize-first-replication`` (about 8 minutes): the same design on six new Zipf seeds, the
  pre-specified test of the primary score with log p(x) held out.
- ``paper``: the published scale (width-1024 tree U-Net, thousands of training strings; hours).

Training settings are tuned for speed and to cross from generalization into memorization within the
budget (masked diffusion, a small tree U-Net, a high learning rate), never for the verdict. The
``generalize-first`` preset's P and length were chosen from the phase picture alone (novel valid samples
peaking while copies are rare; at least about two thirds of the strings memorized by the end).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protomem.errors import ProtomemError
from protomem.study.config import ConditionConfig, apply_overrides

PRESETS = ("quick", "default", "generalize-first", "generalize-first-replication", "paper")


@dataclass
class StudyPreset:
    """A named list of conditions and what it is for."""

    name: str
    description: str
    conditions: list[ConditionConfig] = field(default_factory=list)


def _small_grammar(zipf: float, seed: int) -> dict:
    return {
        "vocab_size": 8,
        "n_classes": 8,
        "rules_per_symbol": 3,
        "branching": 2,
        "depth": 3,
        "zipf_exponent": zipf,
        "seed": seed,
    }


def _large_grammar(zipf: float, seed: int) -> dict:
    return {
        "vocab_size": 16,
        "n_classes": 16,
        "rules_per_symbol": 4,
        "branching": 2,
        "depth": 4,
        "zipf_exponent": zipf,
        "seed": seed,
    }


def _fast_diffusion(steps: int, seed: int) -> dict:
    return {
        "process": "masked",
        "model": "tree_unet",
        "width": 128,
        "steps": steps,
        "batch_size": 128,
        "lr": 3e-3,
        "warmup_steps": 50,
        "lr_schedule": "constant",
        "sampling_steps": 32,
        # pinned: "auto" would pick bf16 on some CPUs and fp32 on others, and the trajectory (hence which
        # strings get memorized when) depends on it; fp32 gives the same result on every machine
        "precision": "fp32",
        "seed": seed,
    }


def log_steps(first: int, last: int, count: int) -> list[int]:
    """``count`` distinct log-spaced steps from ``first`` to ``last`` (both included)."""
    ratio = (last / first) ** (1.0 / max(count - 1, 1))
    return sorted({int(round(first * ratio**i)) for i in range(count)} | {last})


def _condition(name: str, grammar: dict, n_train: int, diffusion: dict, evaluation: dict, analysis: dict):
    return ConditionConfig(
        name=name,
        grammar=grammar,
        data={"n_train": n_train, "seed": grammar["seed"] + 1000},
        diffusion=diffusion,
        evaluation={
            **evaluation,
            "eval_steps": log_steps(
                max(1, diffusion["steps"] // 16), diffusion["steps"], evaluation["n_evals"]
            ),
        },
        analysis=analysis,
    )


def quick_preset() -> StudyPreset:
    evaluation = {"n_evals": 7, "n_samples": 384}
    analysis = {"n_null_draws": 200, "n_bootstrap": 300, "n_permutations": 300, "calibration_samples": 5000}
    conditions = [
        _condition("small-zipf-s0", _small_grammar(1.0, 0), 64, _fast_diffusion(700, 0), evaluation, analysis)
    ]
    return StudyPreset("quick", "one small-grammar Zipf condition, under a minute", conditions)


def default_preset() -> StudyPreset:
    evaluation = {"n_evals": 8, "n_samples": 512}
    analysis = {"n_null_draws": 500}
    conditions = []
    for seed in (0, 1):
        conditions.append(
            _condition(
                f"large-zipf-s{seed}",
                _large_grammar(1.0, seed),
                128,
                _fast_diffusion(1600, seed),
                evaluation,
                analysis,
            )
        )
    conditions.append(
        _condition(
            "large-uniform-s0", _large_grammar(0.0, 0), 128, _fast_diffusion(1600, 0), evaluation, analysis
        )
    )
    for seed in (0, 1):
        conditions.append(
            _condition(
                f"small-zipf-s{seed}",
                _small_grammar(1.0, seed),
                128,
                _fast_diffusion(1200, seed),
                evaluation,
                analysis,
            )
        )
    conditions.append(
        _condition(
            "small-uniform-s0", _small_grammar(0.0, 0), 128, _fast_diffusion(1200, 0), evaluation, analysis
        )
    )
    return StudyPreset("default", "large and small grammar, Zipf and uniform rules, <= 5 minutes", conditions)


def _window_conditions(zipf_seeds: tuple[int, ...], uniform_seeds: tuple[int, ...]) -> list[ConditionConfig]:
    """The generalize-first design (small grammar, P = 256, 10k steps) for the given seeds."""
    steps = 10_000
    evaluation = {"n_evals": 12, "n_samples": 512}
    analysis = {"n_null_draws": 500}
    conditions = []
    for zipf, seeds in ((1.0, zipf_seeds), (0.0, uniform_seeds)):
        kind = "zipf" if zipf else "uniform"
        for seed in seeds:
            condition = _condition(
                f"window-{kind}-s{seed}",
                _small_grammar(zipf, seed),
                256,
                _fast_diffusion(steps, seed),
                evaluation,
                analysis,
            )
            # evaluations from step 25, to show the generalization phase before the first copies
            conditions.append(apply_overrides(condition, {"evaluation.eval_steps": log_steps(25, steps, 12)}))
    return conditions


def generalize_first_preset() -> StudyPreset:
    """The small grammar at P = 256: generalization (novel valid samples) first, then memorization."""
    return StudyPreset(
        "generalize-first",
        "small grammar, P = 256: novel valid strings long before copies, trained until most are memorized",
        _window_conditions(zipf_seeds=(0, 1, 2, 3), uniform_seeds=(0, 1)),
    )


def generalize_first_replication_preset() -> StudyPreset:
    """The generalize-first design on six new Zipf seeds (4-9): the pre-specified test of the primary
    score with log p(x) held out (see the README), which the first run only hinted at."""
    return StudyPreset(
        "generalize-first-replication",
        "the generalize-first design on six new Zipf seeds: a pre-specified test of the held-out score",
        _window_conditions(zipf_seeds=(4, 5, 6, 7, 8, 9), uniform_seeds=()),
    )


def paper_preset() -> StudyPreset:
    """The published scale: hours on a CPU."""
    base = default_preset().conditions
    out = []
    for condition in base:
        out.append(
            apply_overrides(
                condition,
                {
                    "data.n_train": 4096 if condition.grammar.depth == 4 else 2048,
                    "diffusion.width": 1024,
                    "diffusion.steps": 200_000,
                    "diffusion.batch_size": 256,
                    "diffusion.lr": 3e-4,
                    "diffusion.warmup_steps": 1000,
                    "diffusion.ema_decay": 0.999,
                    "diffusion.sampling_steps": 128,
                    "evaluation.n_evals": 20,
                    "evaluation.eval_steps": log_steps(1000, 200_000, 20),
                    "evaluation.n_samples": 4096,
                    "analysis.n_null_draws": 1000,
                },
            )
        )
    return StudyPreset(
        "paper", "the published scale: width-1024 tree U-Net, thousands of strings (hours)", out
    )


def get_preset(name: str) -> StudyPreset:
    """The preset called ``name`` (one of :data:`PRESETS`)."""
    builders = {
        "quick": quick_preset,
        "default": default_preset,
        "generalize-first": generalize_first_preset,
        "generalize-first-replication": generalize_first_replication_preset,
        "paper": paper_preset,
    }
    if name not in builders:
        raise ProtomemError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return builders[name]()
