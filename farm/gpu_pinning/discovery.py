"""Find the host's CUDA devices without creating a CUDA context.

A process that later forks (the Celery prefork parent) must never initialise CUDA, so discovery asks
``nvidia-smi`` in a subprocess instead of calling torch.cuda.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    total_mib: int
    free_mib: int


def discover_cuda_devices(timeout: float = 10.0) -> list[CudaDevice]:
    """The CUDA devices nvidia-smi reports, in index order; empty where there is no driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_nvidia_smi(out)


def parse_nvidia_smi(text: str) -> list[CudaDevice]:
    devices = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4 or not parts[0].isdigit():
            continue
        devices.append(CudaDevice(int(parts[0]), parts[1], int(float(parts[2])), int(float(parts[3]))))
    return sorted(devices, key=lambda d: d.index)
