"""Device maps, thread shares and pinning, checked in fresh processes where torch must not be loaded yet."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from farm.config import ConfigError, load_settings, parse_devices
from farm.gpu_pinning.discovery import parse_nvidia_smi
from farm.gpu_pinning.pinning import cpu_share, plan_pinning


def test_device_map_accepts_cuda_and_cpu_and_bare_cuda_names():
    assert parse_devices("cuda0=cuda:0, cuda1=cuda:1") == {"cuda0": "cuda:0", "cuda1": "cuda:1"}
    assert parse_devices("cuda0=cpu,cuda1=cpu") == {"cuda0": "cpu", "cuda1": "cpu"}
    assert parse_devices("cuda3") == {"cuda3": "cuda:3"}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("cuda0=tpu:0", "must be 'cpu' or 'cuda:N'"),
        ("cuda0=cpu,cuda0=cpu", "listed twice"),
        ("control=cpu", "reserved"),
        ("gpu", "give a device"),
        ("", "empty"),
        ("a-b=cpu", "letters, digits"),
    ],
)
def test_a_bad_device_map_names_farm_devices_and_the_fix(text, needle):
    with pytest.raises(ConfigError) as err:
        parse_devices(text) if text else load_settings({"FARM_DEVICES": ",", "FARM_HOME": "/tmp/x"})
    assert needle in str(err.value) and "FARM_DEVICES" in str(err.value)


def test_visibility_timeout_must_exceed_the_task_time_limit():
    with pytest.raises(ConfigError, match="FARM_VISIBILITY_TIMEOUT"):
        load_settings(
            {"FARM_TASK_TIME_LIMIT": "600", "FARM_VISIBILITY_TIMEOUT": "300", "FARM_DEVICES": "cuda0=cpu"}
        )


def test_cpu_backed_devices_split_the_cores_between_them():
    devices = {"cuda0": "cpu", "cuda1": "cpu"}
    assert cpu_share(devices, cores=16) == 8
    assert cpu_share({"cuda0": "cpu"}, cores=2) == 2
    assert cpu_share({"a": "cpu", "b": "cpu", "c": "cpu"}, cores=2) == 1
    pin = plan_pinning("cuda1", devices)
    assert (pin.device, pin.torch_device) == ("cpu", "cpu") and pin.threads == cpu_share(devices)


def test_a_gpu_worker_sees_its_own_gpu_as_cuda0():
    pin = plan_pinning("cuda1", {"cuda0": "cuda:0", "cuda1": "cuda:1"})
    assert (pin.device, pin.torch_device, pin.threads) == ("cuda:1", "cuda:0", None)


def test_nvidia_smi_output_is_parsed_into_devices():
    out = "0, NVIDIA H100 80GB HBM3, 81559, 81000\n1, NVIDIA H100 80GB HBM3, 81559, 1200\n"
    devices = parse_nvidia_smi(out)
    assert [(d.index, d.total_mib, d.free_mib) for d in devices] == [(0, 81559, 81000), (1, 81559, 1200)]


def _in_fresh_process(code: str, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_pinning_hides_other_gpus_and_limits_threads_before_torch_is_imported():
    code = """
import json, os
from farm.gpu_pinning.pinning import apply_pinning, plan_pinning, limit_torch_threads
apply_pinning(plan_pinning("cuda1", {"cuda0": "cpu", "cuda1": "cpu"}, threads=1))
limit_torch_threads()
import torch
print(json.dumps({"visible": os.environ["CUDA_VISIBLE_DEVICES"], "threads": torch.get_num_threads(),
                  "omp": os.environ["OMP_NUM_THREADS"], "queue": os.environ["FARM_PINNED_QUEUE"]}))
"""
    got = _in_fresh_process(code, {})
    assert got == {"visible": "", "threads": 1, "omp": "1", "queue": "cuda1"}


def test_pinning_after_torch_is_imported_is_refused():
    code = """
import json
import torch
from farm.gpu_pinning.pinning import apply_pinning, plan_pinning
try:
    apply_pinning(plan_pinning("cuda0", {"cuda0": "cpu"}))
    print(json.dumps({"refused": False}))
except RuntimeError as exc:
    print(json.dumps({"refused": "before torch is imported" in str(exc)}))
"""
    assert _in_fresh_process(code, {}) == {"refused": True}
