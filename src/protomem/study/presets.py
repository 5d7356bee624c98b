"""The study's presets: lists of conditions sized for a first look, the default run, and the paper's scale.

Every preset but ``copy-first`` is in the regime of arXiv 2605.30642: novel valid samples rise well before
exact copies take over, then copies dominate and most training strings get memorized.

- ``quick`` (< 1 minute): one small-grammar Zipf condition with a matched training set (tests, a first
  look).
- ``default`` (<= 5 minutes on 2 CPU cores): the decisive design at its smallest: two grammars with Zipf
  rules and a *matched* training set (the primary score and log p(x) decorrelated by design,
  protomem.study.design), two seeds each. The small grammar (v=8, m=3, L=3: 17,496 strings, P = 192,
  where the nulls do much of the work) and the deep grammar (v=8, m=2, s=2, L=4: 16 tokens, 262,144
  strings, P = 128: no training string has K p(x) above 0.15, so a copy is not a lucky grammatical
  sample). Both generalize first at these P (chosen from phase pictures); sampler steps are 4 per token.
- ``decisive``: the same design with enough seeds for power >= 0.9 (protomem.study.power), pre-specified
  before it was run (docs/results/study.md).
- ``zipf-levels``: claim (b), skew near the root vs near the tokens vs uniform rules, paired seeds.
- ``copy-first`` (about 3 minutes): the earlier default, where the large grammar (v=16, m=4, L=4) copies
  before it learns the grammar; kept to reproduce the results recorded for it.
- ``generalize-first`` (about 8 minutes): the small grammar with P = 256 training strings, the
  regime of the paper, where the model produces novel valid strings hundreds of steps before it copies
  (the scaling sweep's onsets: tau_gen ~ 55 steps, tau_mem ~ 900 at this P), trained until most
  training strings are memorized; Zipf rules with four seeds, uniform rules (the control) with two.
- ``generalize-first-replication`` (about 8 minutes): the same design on six new Zipf seeds, the
  pre-specified test of the primary score with log p(x) held out.
- ``paper``: the published scale (width-1024 tree U-Net, thousands of training strings; hours).

Training settings are tuned for speed and to cross from generalization into memorization within the
budget (masked diffusion, a small tree U-Net, a high learning rate), never for the verdict. Grammars, P
and lengths were chosen from phase pictures alone (novel valid samples peaking while copies are rare;
most strings memorized by the end).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protomem.errors import ProtomemError
from protomem.study.config import ConditionConfig, apply_overrides

PRESETS = (
    "quick",
    "default",
    "decisive",
    "zipf-levels",
    "copy-first",
    "generalize-first",
    "generalize-first-replication",
    "paper",
)


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


def _deep_grammar(zipf: float, seed: int, zipf_levels: list[int] | None = None) -> dict:
    """v=8, n=8, m=2, s=2, L=4: 16 tokens, 8 * 2^15 = 262,144 strings."""
    return {
        "vocab_size": 8,
        "n_classes": 8,
        "rules_per_symbol": 2,
        "branching": 2,
        "depth": 4,
        "zipf_exponent": zipf,
        "zipf_levels": zipf_levels,
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


def _paper_regime(name: str, grammar: dict, n_train: int, steps: int, evaluation: dict) -> ConditionConfig:
    """A condition of the paper's regime: matched training set, evaluations from step 25, 4 sampler steps
    per token."""
    diffusion = _fast_diffusion(steps, grammar["seed"])
    diffusion["sampling_steps"] = 4 * grammar["branching"] ** grammar["depth"]
    condition = _condition(name, grammar, n_train, diffusion, evaluation, {"n_null_draws": 500})
    return apply_overrides(
        condition,
        {
            "data.design": "matched",
            "evaluation.eval_steps": log_steps(25, steps, evaluation["n_evals"]),
        },
    )


def _decisive_conditions(seeds: tuple[int, ...]) -> list[ConditionConfig]:
    """The decisive design for the given seeds: small grammar (P = 192) and deep grammar (P = 128), Zipf
    rules, matched training sets, 4,000 steps."""
    evaluation = {"n_evals": 12, "n_samples": 512}
    conditions = []
    for seed in seeds:
        conditions.append(
            _paper_regime(f"small-zipf-s{seed}", _small_grammar(1.0, seed), 192, 4000, evaluation)
        )
        conditions.append(
            _paper_regime(f"deep-zipf-s{seed}", _deep_grammar(1.0, seed), 128, 4000, evaluation)
        )
    return conditions


def quick_preset() -> StudyPreset:
    evaluation = {"n_evals": 8, "n_samples": 384}
    condition = _paper_regime("small-zipf-s0", _small_grammar(1.0, 0), 128, 1500, evaluation)
    condition = apply_overrides(
        condition,
        {
            "evaluation.eval_steps": log_steps(20, 1500, 8),
            "analysis.n_null_draws": 200,
            "analysis.n_bootstrap": 300,
            "analysis.n_permutations": 300,
            "analysis.calibration_samples": 5000,
        },
    )
    return StudyPreset("quick", "one small-grammar Zipf condition (matched set), under a minute", [condition])


def default_preset() -> StudyPreset:
    return StudyPreset(
        "default",
        "the decisive design at its smallest: small and deep grammar, Zipf rules, matched training sets, "
        "two seeds each, <= 5 minutes",
        _decisive_conditions((0, 1)),
    )


def decisive_preset() -> StudyPreset:
    return StudyPreset(
        "decisive",
        "the default design with enough seeds for power >= 0.9 to detect rho = 0.08 against both nulls",
        _decisive_conditions(DECISIVE_SEEDS),
    )


# Fixed from the power analysis of the default run before the decisive run (docs/results/study.md).
DECISIVE_SEEDS: tuple[int, ...] = tuple(range(100, 120))


def zipf_levels_preset() -> StudyPreset:
    """Claim (b): the deep grammar (L = 4) with uniform rules, Zipf rules (exponent 1) on the two levels
    nearest the root, or on the two nearest the tokens; the three arms share grammar seeds (same rule
    tables) and training-set seeds. Random training sets, no likelihood endpoint: only tau_mem is needed."""
    steps = 3000
    conditions = []
    for seed in ZIPF_LEVELS_SEEDS:
        for arm, zipf, levels in (("uniform", 0.0, None), ("top", 1.0, [0, 1]), ("bottom", 1.0, [2, 3])):
            diffusion = _fast_diffusion(steps, seed)
            diffusion["sampling_steps"] = 64
            condition = _condition(
                f"deep-{arm}-s{seed}",
                _deep_grammar(zipf, seed, levels),
                128,
                diffusion,
                {"n_evals": 14, "n_samples": 512},
                {"n_null_draws": 100, "n_bootstrap": 200, "n_permutations": 200},
            )
            conditions.append(
                apply_overrides(
                    condition,
                    {"evaluation.eval_steps": log_steps(100, steps, 14), "evaluation.likelihood_draws": 0},
                )
            )
    return StudyPreset(
        "zipf-levels",
        "claim (b): skew near the root vs near the tokens vs uniform rules, deep grammar, paired seeds",
        conditions,
    )


ZIPF_LEVELS_SEEDS: tuple[int, ...] = tuple(range(12))


def copy_first_preset() -> StudyPreset:
    """The earlier default: the large grammar copies before it learns the grammar (not the paper's regime)."""
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
    return StudyPreset(
        "copy-first",
        "the earlier default: large and small grammar, Zipf and uniform rules (copy-first)",
        conditions,
    )


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
        "decisive": decisive_preset,
        "zipf-levels": zipf_levels_preset,
        "copy-first": copy_first_preset,
        "generalize-first": generalize_first_preset,
        "generalize-first-replication": generalize_first_replication_preset,
        "paper": paper_preset,
    }
    if name not in builders:
        raise ProtomemError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    return builders[name]()
