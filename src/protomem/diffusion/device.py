"""Where tensors live: the ``device`` setting (``auto | cpu | cuda | cuda:N | mps``) and its resolution.

``auto`` means the first CUDA device when torch sees one, else the CPU (never MPS: pick it by name). A
named device that this torch build or machine does not have is refused with a one-line error saying what
torch sees. Everything here imports torch lazily except :data:`DEVICE_PATTERN`, which configs use.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from protomem.errors import ProtomemError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:[0-9]+|mps)$"
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
# The sustained GPU throughput (TFLOP/s) that plans convert FLOPs to GPU-hours with, unless told another:
# an assumption (about a sixth of an A100's dense bf16 peak), not a measurement.
DEFAULT_GPU_TFLOPS = 50.0


def check_device_name(name: str) -> str:
    """``name`` if it is a device setting (see :data:`DEVICE_PATTERN`), else a one-line error."""
    if not isinstance(name, str) or not re.match(DEVICE_PATTERN, name):
        raise ProtomemError(f"device must be {DEVICE_CHOICES}, got {name!r}")
    return name


def _cuda_missing(torch_module) -> str:
    build = torch_module.__version__
    if torch_module.version.cuda is None:
        return f"this torch ({build}) is a CPU-only build; see docs/devices.md to install a CUDA build"
    return f"torch {build} (CUDA {torch_module.version.cuda}) sees no CUDA device"


def resolve_device(name: str | torch.device) -> torch.device:
    """The torch device a setting means on this machine: ``auto`` -> ``cuda:K`` (K = the current CUDA
    device) when torch sees a GPU, else ``cpu``; ``cuda`` -> ``cuda:K``.

    Raises:
        ProtomemError: the device is malformed or not available here (e.g. ``cuda`` on a CPU-only torch).
    """
    import torch

    name = check_device_name(str(name))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ProtomemError("device mps requested, but torch sees no MPS (Apple GPU) device")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ProtomemError(f"device {name} requested, but {_cuda_missing(torch)}")
    index = torch.cuda.current_device() if name == "cuda" else int(name.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise ProtomemError(f"device {name} requested, but torch sees {count} CUDA device(s): 0..{count - 1}")
    return torch.device("cuda", index)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else the platform's answer, else "unknown")."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_label(device: torch.device) -> str:
    """The hardware in one line: ``cuda:0 (NVIDIA A100-SXM4-80GB, 80 GB)``, ``cpu (AMD EPYC, 2 cores)``."""
    import os

    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 1024**3:.0f} GB)"
    if device.type == "cpu":
        return f"cpu ({cpu_model()}, {os.cpu_count()} cores)"
    return str(device)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively: a CPU with AVX512-BF16 / AMX (oneDNN's
    check) or a CUDA GPU that supports bf16 (compute capability 8.0 on); never MPS here."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without parameters)."""
    import torch

    for parameter in module.parameters():
        return parameter.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing); a no-op on the CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
