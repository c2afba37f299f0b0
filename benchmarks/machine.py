"""One line naming the hardware a benchmark ran on (every benchmark prints it with its table)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """'<cpu> (<arch>), N CPUs, <GPU name or "no GPU">, torch X'."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs, {gpu}, "
        f"torch {torch.__version__}"
    )
