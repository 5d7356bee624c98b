"""Parameter sweeps on Ray: every point of a grid over study-config keys is one study run.

Modules, in the order data flows::

    spec        the sweep file: base condition + grid / points -> SweepPoint(name, params)
    conditions  each point's validated ConditionConfig, through the study API only
    runner      run_sweep(): Ray tasks (one CPU, one torch thread each), retries, resume, skip finished
    layout      where a sweep directory keeps runs, attempts, manifest and tables
    gather      points / checkpoints / examples tables -> sweep.duckdb + Parquet
    onsets      τ_mem, τ_gen of a run; power-law fits across P with bootstrap-t intervals
    query       SQL over sweep.duckdb as a rich table
    report      the self-contained HTML report
    commands    ``protomem sweep FILE | run | query | report``

From Python::

    from protomem.sweep.spec import load_spec
    from protomem.sweep.runner import run_sweep
    result = run_sweep(load_spec("examples/sweeps/tiny.yaml"), "runs/sweeps/tiny")

Nothing here imports Ray at module level: it is an optional extra (``pip install 'protomem[sweep]'``).
"""
