"""What machine a benchmark ran on: printed at the top of every benchmark's output."""

from __future__ import annotations

import os
import platform

from protomem.diffusion.device import cpu_model


def describe(threads: int | None = None) -> str:
    """One line: CPU model, cores, threads used, load average, Python and numpy versions."""
    import numpy as np

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    parts = [
        f"cpu: {cpu_model()}",
        f"cores: {os.cpu_count()}",
        f"threads: {threads if threads is not None else 'n/a'}",
        f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"python {platform.python_version()}",
        f"numpy {np.__version__}",
    ]
    return "machine | " + " | ".join(parts)
