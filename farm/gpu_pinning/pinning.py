"""Pin the current process to one device before torch is imported.

A worker for ``cuda1=cuda:1`` sees only GPU 1 (as ``cuda:0``); a CPU-backed worker sees no GPU and gets its
share of the cores, so two CPU workers on one host do not fight over the same threads.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass(frozen=True)
class Pinning:
    queue: str
    device: str  # as configured: "cpu" or "cuda:N"
    torch_device: str  # as seen inside the pinned process: "cpu" or "cuda:0"
    threads: int | None


def cpu_share(devices: dict[str, str], cores: int | None = None) -> int:
    """Torch threads for one CPU-backed worker: the host's cores split evenly between CPU devices."""
    cores = cores or os.cpu_count() or 1
    cpu_workers = sum(1 for d in devices.values() if d == "cpu") or 1
    return max(1, cores // cpu_workers)


def plan_pinning(queue: str, devices: dict[str, str], threads: int | None = None) -> Pinning:
    if queue not in devices:
        known = ", ".join(sorted(devices))
        raise ValueError(f"device {queue!r} is not in FARM_DEVICES (known: {known})")
    device = devices[queue]
    if device == "cpu":
        return Pinning(queue, device, "cpu", threads or cpu_share(devices))
    return Pinning(queue, device, "cuda:0", threads)


def pinning_env(pin: Pinning) -> dict[str, str]:
    """The environment variables that decide what torch (and the ONNX models) will see in a pinned process."""
    env = {
        "FARM_PINNED_QUEUE": pin.queue,
        "FARM_PINNED_DEVICE": pin.torch_device,
        "CUDA_VISIBLE_DEVICES": "" if pin.device == "cpu" else pin.device.split(":")[1],
    }
    if pin.threads:
        env.update(dict.fromkeys(_THREAD_VARS, str(pin.threads)))
        env["FARM_PINNED_THREADS"] = str(pin.threads)
    return env


def apply_pinning(pin: Pinning) -> None:
    """Set the environment that decides what torch will see. Must run before torch is imported."""
    if "torch" in sys.modules:
        raise RuntimeError("apply_pinning must run before torch is imported")
    os.environ.update(pinning_env(pin))


def pinned_role() -> str:
    """``qc`` in a device's QC worker, ``""`` in its generating (or, FARM_QC=inline, only) worker."""
    return os.environ.get("FARM_PINNED_ROLE", "")


def pinned() -> tuple[str, str]:
    """(queue, torch device) this process was pinned to; an unpinned process runs on the CPU."""
    return os.environ.get("FARM_PINNED_QUEUE", ""), os.environ.get("FARM_PINNED_DEVICE", "cpu")


def limit_torch_threads() -> None:
    """Apply the pinned thread count inside torch (the env vars alone do not bind an imported torch)."""
    threads = os.environ.get("FARM_PINNED_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
