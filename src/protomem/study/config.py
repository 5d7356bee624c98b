"""ConditionConfig: one training condition of the study (grammar, data, diffusion, evaluation, analysis).

Every section is a pydantic model with ``extra="forbid"``; a bad value raises
:class:`~protomem.errors.ProtomemError` naming the field. ``apply_overrides(config, {"a.b": value})``
returns a validated copy (used by the sweeps and the CLI).

The ``diffusion`` section holds every :class:`~protomem.diffusion.DiffusionConfig` field except those the
study derives from the other sections (vocabulary, sequence length, branching, classes, evaluation
schedule and sample count), so it stays in step with the diffusion package automatically.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from protomem.diffusion.config import MAX_SEED, DiffusionConfig, validation_message
from protomem.errors import ProtomemError

# DiffusionConfig fields the study sets itself (from the grammar and evaluation sections).
DERIVED_DIFFUSION_FIELDS = (
    "vocab_size",
    "seq_len",
    "branching",
    "n_classes",
    "eval_steps",
    "n_evals",
    "eval_samples",
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class GrammarSection(_Section):
    """The RHM: v symbols, n classes, m rules per symbol, branching s, depth L, Zipf exponent and levels."""

    vocab_size: int = Field(8, ge=2)
    n_classes: int = Field(8, ge=1)
    rules_per_symbol: int = Field(3, ge=1)
    branching: int = Field(2, ge=2)
    depth: int = Field(3, ge=1)
    zipf_exponent: float = Field(1.0, ge=0.0, description="0 = uniform rule probabilities.")
    zipf_levels: list[int] | None = Field(None, description="Levels with Zipf rules; None = all levels.")
    seed: int = Field(0, ge=0, le=MAX_SEED)


class DataSection(_Section):
    """The training set: P distinct strings drawn from the grammar."""

    n_train: int = Field(128, ge=2, description="P, distinct training strings.")
    seed: int = Field(1, ge=0, le=MAX_SEED)
    class_conditional: bool = Field(False, description="Train a class-conditional model.")
    design: Literal["random", "matched"] = Field(
        "random",
        description="random: a plain distinct draw; matched: the primary score and log p(x) decorrelated "
        "by log p(x)-matched exchanges from a pool (protomem.study.design).",
    )
    pool_factor: int = Field(8, ge=2, description="The matched design's pool: pool_factor x P strings.")


class EvaluationSection(_Section):
    """When to evaluate and how many samples to draw."""

    n_evals: int = Field(10, ge=2, description="Log-spaced evaluation steps (the final step included).")
    eval_steps: list[int] | None = Field(None, description="Explicit evaluation steps instead.")
    n_samples: int = Field(512, ge=1, description="K, samples generated at each evaluation.")
    finer_sampling_steps: int | None = Field(
        None, ge=1, description="Sampler steps of the final-checkpoint check; None = 4x the training sampler."
    )
    likelihood_draws: int | None = Field(
        None,
        ge=0,
        description="Noise draws of each string's ELBO per evaluation; None = the string length (one per "
        "number of masked tokens); 0 = no likelihood endpoint.",
    )
    heldout_strings: int | None = Field(
        None, ge=8, description="Held-out grammar strings for the likelihood endpoint; None = P."
    )


class AnalysisSection(_Section):
    """Thresholds and Monte Carlo sizes of the statistics."""

    min_excess: int = Field(2, ge=1, description="Memorized: copies >= round(K p(x)) + min_excess.")
    primary_score: str = Field("rule_count_mean", description="Prototypicality score of the verdict.")
    n_null_draws: int = Field(500, ge=10)
    n_bootstrap: int = Field(1000, ge=10)
    n_permutations: int = Field(1000, ge=10)
    calibration_bins: int = Field(6, ge=1, description="log p(x) bins of the calibrated null.")
    calibration_samples: int = Field(
        20_000, ge=100, description="Fresh grammar samples to estimate bin mass."
    )
    alpha: float = Field(0.01, gt=0.0, lt=1.0, description="Significance level of the verdict.")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    heldout_matches: int = Field(
        8, ge=1, description="Held-out strings of the same class and nearest log p(x) matched to each string."
    )
    likelihood_quantile: float = Field(
        0.99,
        gt=0.5,
        lt=1.0,
        description="Likelihood endpoint: memorized once the gain exceeds this quantile of the held-out "
        "strings' own gains at that checkpoint.",
    )


def _diffusion_settings_model() -> type[BaseModel]:
    fields = {
        name: (info.annotation, info)
        for name, info in DiffusionConfig.model_fields.items()
        if name not in DERIVED_DIFFUSION_FIELDS
    }
    return create_model(  # type: ignore[call-overload]
        "DiffusionSettings",
        __config__=ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False),
        **fields,
    )


DiffusionSettings = _diffusion_settings_model()


class ConditionConfig(_Section):
    """One condition: a grammar, a training set, a diffusion run, its evaluation and analysis."""

    name: str = Field("condition", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    grammar: GrammarSection = Field(default_factory=GrammarSection)
    data: DataSection = Field(default_factory=DataSection)
    diffusion: DiffusionSettings = Field(default_factory=lambda: DiffusionSettings(process="masked"))  # type: ignore[valid-type]
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    analysis: AnalysisSection = Field(default_factory=AnalysisSection)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ProtomemError(
                validation_message(exc).replace("diffusion config", "study condition")
            ) from None

    @model_validator(mode="after")
    def _check(self) -> ConditionConfig:
        from protomem.grammar.rhm import check_parameters

        g = self.grammar
        check_parameters(g.vocab_size, g.n_classes, g.rules_per_symbol, g.branching, g.depth)
        if g.zipf_levels is not None and any(not 0 <= lv < g.depth for lv in g.zipf_levels):
            raise ValueError(f"grammar.zipf_levels must lie in [0, {g.depth})")
        scores = {"logprob", "rule_count_mean", "nn_hamming"} | {
            f"{name}_l{level}"
            for level in range(g.depth)
            for name in ("block_count_same_pos", "block_count_any_pos", "rule_count")
        }
        if self.analysis.primary_score not in scores:
            raise ValueError(f"analysis.primary_score must be one of {sorted(scores)}")
        if self.evaluation.eval_steps is not None:
            bad = [s for s in self.evaluation.eval_steps if not 1 <= s <= self.diffusion.steps]
            if bad:
                raise ValueError(f"evaluation.eval_steps {bad} lie outside 1..diffusion.steps")
        self.diffusion_config()  # DiffusionConfig's own consistency checks, now rather than at run time
        return self

    def diffusion_config(self) -> DiffusionConfig:
        """The DiffusionConfig this condition trains with."""
        g = self.grammar
        fields = dict(self.diffusion.model_dump())
        fields.update(
            vocab_size=g.vocab_size,
            seq_len=g.branching**g.depth,
            branching=g.branching,
            n_classes=g.n_classes if self.data.class_conditional else 0,
            eval_steps=self.evaluation.eval_steps,
            n_evals=self.evaluation.n_evals,
            eval_samples=self.evaluation.n_samples,
        )
        return DiffusionConfig(**fields)

    def likelihood_draws(self) -> int:
        """ELBO noise draws per string and evaluation (0: no likelihood endpoint)."""
        if self.evaluation.likelihood_draws is not None:
            return self.evaluation.likelihood_draws
        return self.grammar.branching**self.grammar.depth

    def finer_sampling_steps(self) -> int:
        if self.evaluation.finer_sampling_steps is not None:
            return self.evaluation.finer_sampling_steps
        base = self.diffusion_config().resolved_sampling_steps()
        if self.diffusion.process == "uniform":
            return min(4 * base, self.diffusion.timesteps)
        return 4 * base

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def condition_from_dict(doc: object, path: object | None = None) -> ConditionConfig:
    """Validate a mapping (e.g. a config.yaml) into a ConditionConfig; errors name ``path``."""
    if not isinstance(doc, dict):
        raise ProtomemError("a study condition must be a mapping", path=path)
    try:
        return ConditionConfig(**doc)
    except ProtomemError as exc:
        raise ProtomemError(exc.message, path=path) from None


def apply_overrides(config: ConditionConfig, overrides: dict[str, Any]) -> ConditionConfig:
    """A validated copy of ``config`` with dotted keys replaced, e.g. {"grammar.zipf_exponent": 0.5}.

    Raises:
        ProtomemError: naming an unknown key, or the field whose new value is invalid.
    """
    doc = copy.deepcopy(config.model_dump(mode="json"))
    for key, value in overrides.items():
        parts = str(key).split(".")
        node: Any = doc
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise ProtomemError(f"unknown study config key {key!r} (no {'.'.join(parts[: i + 1])!r})")
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return ConditionConfig(**doc)
