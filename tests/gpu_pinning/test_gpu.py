"""On a real CUDA host: discovery, a worker pinned to cuda:0 generating on the GPU, no CUDA context in the
prefork parent. Marked gpu; skipped where nvidia-smi finds no device (CI has none)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
from sqlalchemy import select

from farm import dispatch
from farm.config import load_settings
from farm.db import Batch, Candidate, Worker, session_scope
from farm.gpu_pinning.discovery import discover_cuda_devices
from farm.stack import Stack

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not discover_cuda_devices(), reason="needs a CUDA device (nvidia-smi finds none)"),
]


def test_discovery_reports_name_and_memory_without_touching_cuda():
    devices = discover_cuda_devices()
    assert devices[0].index == 0 and devices[0].total_mib > 1000 and devices[0].name


def _cuda_pids() -> set[int]:
    out = subprocess.run(
        [shutil.which("nvidia-smi"), "--query-compute-apps=pid", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(x) for x in out.split() if x.strip().isdigit()}


# FARM_QC=worker: the device worker's QC worker is pinned to the same GPU and checks there.
@pytest.mark.parametrize("qc", ["inline", "worker"])
def test_a_worker_pinned_to_a_gpu_generates_there_and_its_parent_holds_no_cuda_context(tmp_path, qc):
    env = {"FARM_HOME": str(tmp_path), "FARM_DEVICES": "cuda0=cuda:0", "HF_HUB_OFFLINE": "1", "FARM_QC": qc}
    import os

    env = {**os.environ, **env}
    env.pop("FARM_BROKER_URL", None)
    settings = load_settings(env)
    with Stack(settings, env=env) as stack:
        stack.start_workers()
        text = (
            "name: gpu\nmodel: tiny\ndtype: fp16\ndefaults: {candidates: 4, steps: 2, size: 64x64}\n"
            "items: [a red fox, a lighthouse]\n"
        )
        done = dispatch.submit(text, settings=settings)
        deadline = time.monotonic() + 300
        while True:
            stack.check_alive()
            with session_scope(settings.database_url) as s:
                if s.get(Batch, done.batch_id).status == "done":
                    break
            assert time.monotonic() < deadline
            time.sleep(0.5)
        with session_scope(settings.database_url) as s:
            cands = s.scalars(select(Candidate).where(Candidate.batch_id == done.batch_id)).all()
            workers = {w.name.startswith("qc-"): w for w in s.scalars(select(Worker))}
        worker = workers[False]
        assert len(workers) == (2 if qc == "worker" else 1)
        assert all(
            c.recipe.get("device") == "cuda:0" and c.recipe.get("dtype") == "fp16"
            for c in cands
            if c.image_path
        )
        assert worker.device == "cuda:0"
        parent = stack.proc("worker-cuda0").popen.pid
        holders = _cuda_pids()
        assert worker.pid in holders, "the pool child runs on the GPU"
        assert parent not in holders, "the prefork parent never created a CUDA context"
        if qc == "worker":
            checker = workers[True]
            assert checker.device == "cuda:0" and checker.pid in holders, "its QC worker checks on the GPU"
            assert not [k for k in checker.loaded if k.startswith("generator:")]
            assert all(c.status in ("passed", "rejected") for c in cands)
            assert not list(settings.handoff_dir.rglob("*.npy"))
