"""A stand-in for the study's run_condition, for testing the sweep machinery fast (no training).

It writes what the study writes that the sweep reads (metrics.parquet per evaluation step,
per_example.parquet, summary.json with "status": "complete" last), from a known trajectory: the fraction of
exact copies is a logistic in log(step) centred on ``true_tau_mem`` = 2·P·(1 + zipf_exponent / 2), the
fraction of novel valid samples rises around step 20 and falls as copies take over. It resumes after the
last evaluation it wrote, can sleep per evaluation (to be killed midway) and can fail its first attempt.
The real study is exercised by the slow test in test_sweep_ray.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from protomem.errors import ProtomemError
from protomem.io import atomic_path, write_json_atomic


class FakeCondition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_train: int = 32
    zipf_exponent: float = 0.0
    zipf_levels: list[int] | None = None
    depth: int = 4
    steps: int = 2000
    seed: int = 0
    n_evals: int = 12
    sleep: float = 0.0
    fail_first: bool = False


def true_tau_mem(config: FakeCondition) -> float:
    return 2.0 * config.n_train * (1.0 + config.zipf_exponent / 2.0) * (1.0 + 0.05 * config.seed)


TRUE_TAU_GEN = 20.0


def eval_steps(config: FakeCondition) -> np.ndarray:
    return np.unique(np.round(np.geomspace(1, config.steps, config.n_evals)).astype(np.int64))


def fractions(config: FakeCondition, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    steps = np.asarray(steps, dtype=np.float64)
    exact = 1.0 / (1.0 + (true_tau_mem(config) / steps) ** 3)
    novel = (1.0 / (1.0 + (TRUE_TAU_GEN / steps) ** 3)) * (1.0 - exact)
    return exact, novel


def fake_run_condition(
    config: FakeCondition,
    out_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (resume or overwrite):
        raise ProtomemError("run directory exists", path=out_dir)
    if out_dir.is_dir() and overwrite and not resume:
        for path in out_dir.iterdir():
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(config.model_dump_json())  # like the study: written after setup
    state_path = out_dir / "state.json"
    state = json.loads(state_path.read_text()) if resume and state_path.exists() else {"done": 0, "starts": 0}
    state["starts"] += 1
    write_json_atomic(state_path, state)
    steps = eval_steps(config)
    exact, novel = fractions(config, steps)
    for i in range(state["done"], steps.size):
        time.sleep(config.sleep)
        table = pa.table(
            {
                "step": steps[: i + 1],
                "loss": np.linspace(2.0, 0.1, steps.size)[: i + 1],
                "frac_exact_copy": exact[: i + 1],
                "frac_novel_valid": novel[: i + 1],
                "frac_invalid": (1 - exact - novel)[: i + 1],
            }
        )
        with atomic_path(out_dir / "metrics.parquet") as tmp:
            pq.write_table(table, tmp)
        state["done"] = i + 1
        write_json_atomic(state_path, state)
        if config.fail_first and state["starts"] == 1 and i == steps.size // 2:
            raise RuntimeError("injected failure")
    rng = np.random.default_rng(config.seed)
    score = rng.normal(size=config.n_train)
    first = np.where(score > 0, 100.0, 1000.0)
    pq.write_table(
        pa.table({"index": np.arange(config.n_train), "score": score, "first_step": first}),
        out_dir / "per_example.parquet",
    )
    write_json_atomic(
        out_dir / "summary.json",
        {
            "status": "complete",
            "rho": -0.3 * config.zipf_exponent,
            "rho_ci_low": -0.3 * config.zipf_exponent - 0.1,
            "rho_ci_high": -0.3 * config.zipf_exponent + 0.1,
            "verdict": {"text": "fake", "p_value": 0.01},
        },
    )
    return out_dir
