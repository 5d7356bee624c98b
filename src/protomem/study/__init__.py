"""The memorization study: conditions, presets, the pipeline, statistics and reports.

- :mod:`protomem.study.config`: ``ConditionConfig`` and ``apply_overrides``;
- :mod:`protomem.study.presets`: ``get_preset("quick" | "default" | "generalize-first" | "paper")``;
- :mod:`protomem.study.pipeline`: ``run_condition`` (one condition into a run directory);
- :mod:`protomem.study.runner`: ``run_study`` (every condition of a preset, pooled verdict);
- :mod:`protomem.study.analysis`, :mod:`protomem.study.stats`: tables, Monte Carlo nulls, verdicts;
- :mod:`protomem.study.report`, :mod:`protomem.study.figures`: the HTML reports;
- :mod:`protomem.study.images`: the image variant (``protomem study --modality images``).

Import the submodules directly; this package imports nothing heavy so ``protomem --help`` stays fast.
"""
