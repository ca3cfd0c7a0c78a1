"""The command Celery users try first, `celery -A farm.celery_app worker -Q cuda0`: it becomes the same device
worker `farm worker --device cuda0` starts (pinned, named after the device, one prefork child, a heartbeat in
the workers table), and a command that would take slices unpinned refuses to start, saying what to run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from farm.broker import CONTROL_QUEUE, SLICES_QUEUE
from farm.config import load_settings
from farm.gpu_pinning.bootstep import DeviceWorkerRefused, plan_device_worker
from farm.placement import preload_queue

HOST = socket.gethostname()
MANIFEST = """
name: plain-celery
model: tiny
defaults: {candidates: 2, steps: 1, size: 64x64, seed: 3}
items:
  - a red kite
"""


def _plan(**kwargs):
    settings = load_settings({"FARM_HOME": "/tmp/farm-plan", "FARM_DEVICES": "cuda0=cpu,cuda1=cpu"})
    options = {
        "device": None,
        "consuming": {CONTROL_QUEUE},
        "hostname": f"celery@{HOST}",
        "concurrency": None,
        "prefork": True,
        **kwargs,
    }
    return settings, plan_device_worker(settings, **options)


def test_dash_q_with_a_device_queue_makes_that_devices_worker_named_and_fed_like_farm_worker():
    settings, plan = _plan(consuming={"cuda0"})
    model_queue = preload_queue(settings.preload_generator, settings.preload_dtype)
    assert plan is not None and plan.inferred
    assert (plan.queue, plan.hostname) == ("cuda0", f"cuda0@{HOST}")
    # Its own queue first (the rest of the chains it generated), then what any device worker takes.
    assert plan.queues == [f"cuda0@{HOST}", "cuda0", SLICES_QUEUE, model_queue]
    _, plan = _plan(device="cuda1")  # --device without -Q: Celery's default queue is replaced
    assert plan is not None and not plan.inferred and plan.queues[:2] == [f"cuda1@{HOST}", "cuda1"]


def test_workers_that_take_no_slices_or_are_pinned_already_are_left_as_they_are():
    assert _plan()[1] is None  # the control queue
    assert _plan(consuming={"cuda0", SLICES_QUEUE}, hostname=f"cuda0@{HOST}", pinned_queue="cuda0")[1] is None


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"consuming": {SLICES_QUEUE}}, "--device cuda0"),
        ({"consuming": {"cuda0", "cuda1"}}, "pinned to one device"),
        ({"consuming": {"cuda0", CONTROL_QUEUE}}, "farm worker --control"),
        ({"device": "cuda7"}, "not in FARM_DEVICES"),
        ({"device": "cuda0", "concurrency": 4}, "one pool child"),
        ({"device": "cuda0", "prefork": False}, "prefork"),
        ({"device": "cuda0", "hostname": f"gpu@{HOST}"}, "-n cuda0@%h"),
        ({"consuming": {f"qc-cuda0@{HOST}"}}, "farm worker --device cuda0 --qc"),
        ({"device": "cuda1", "pinned_queue": "cuda0"}, "already pinned to cuda0"),
    ],
)
def test_a_worker_that_would_take_slices_unpinned_or_misnamed_is_refused_with_what_to_run(options, needle):
    with pytest.raises(DeviceWorkerRefused) as err:
        _plan(**options)
    assert needle in str(err.value)


def _celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "farm.celery_app", "worker", *args, "--loglevel=INFO"]


def _run_to_exit(argv: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int | None, str]:
    """Run a worker command that should exit by itself; one that does not is killed with its pool children."""
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        return None, stderr
    return proc.returncode, stderr


@pytest.mark.slow
def test_plain_celery_worker_dash_q_cuda0_is_pinned_named_and_finishes_a_slice(tmp_path: Path):
    """Real processes on the embedded Redis: `-Q slices` refuses before taking anything (the batch's slice
    stays queued), then `celery -A farm.celery_app worker -Q cuda0` serves it as cuda0@host: one prefork child
    pinned to cuda0, its workers row written, the slice generated there and the batch done."""
    from farm import dispatch
    from farm.broker import device_workers, queue_length
    from farm.celery_app import make_app
    from farm.db import Batch, Candidate, Worker, session_scope
    from farm.stack import Stack

    env = {**os.environ, "FARM_HOME": str(tmp_path / "home")}
    env.pop("FARM_BROKER_URL", None)
    settings = load_settings(env)
    app = make_app(settings)
    stack = Stack(settings, env=env)
    try:
        stack.prepare()
        stack.start_control()
        batch_id = dispatch.submit(MANIFEST, settings=settings).batch_id
        deadline = time.monotonic() + 240
        while queue_length(app, SLICES_QUEUE) == 0:
            assert time.monotonic() < deadline, "the control worker did not dispatch the batch"
            stack.check_alive()
            time.sleep(0.5)

        code, stderr = _run_to_exit(_celery("-Q", SLICES_QUEUE), env)
        assert code == 2, stderr[-2000:]
        assert "celery -A farm.celery_app worker --device cuda0" in stderr
        assert queue_length(app, SLICES_QUEUE) == 1, "the refused worker took nothing"

        plain = stack.spawn("plain-cuda0", _celery("-Q", "cuda0"))
        name = f"cuda0@{HOST}"
        while not device_workers(app, "cuda0", timeout=1):
            assert time.monotonic() < deadline + 240, plain.log.read_text(errors="replace")[-3000:]
            stack.check_alive()
            time.sleep(1)
        assert device_workers(app, "cuda0") == [name]
        stats = app.control.inspect(destination=[name], timeout=5).stats()[name]
        assert stats["pool"]["max-concurrency"] == 1
        assert stats["pool"]["implementation"].endswith("prefork:TaskPool")
        (child,) = stats["pool"]["processes"]
        active = app.control.inspect(destination=[name], timeout=5).active_queues()[name]
        assert {q["name"] for q in active} >= {name, "cuda0", SLICES_QUEUE}

        while True:
            with session_scope(settings.database_url) as s:
                status = s.get(Batch, batch_id).status
                if status == "done":
                    cands = s.scalars(select(Candidate).where(Candidate.batch_id == batch_id)).all()
                    row = s.get(Worker, name)
                    break
            assert time.monotonic() < deadline + 600, plain.log.read_text(errors="replace")[-3000:]
            stack.check_alive()
            time.sleep(0.5)
        assert {(c.status in ("passed", "rejected"), c.device, c.worker) for c in cands} == {
            (True, "cuda0", name)
        }
        assert row is not None and (row.queue, row.device, row.pid) == ("cuda0", "cpu", child)
        while not set(row.queues or ()) >= {"cuda0", SLICES_QUEUE}:  # the main process's beat (farm.worker)
            assert time.monotonic() < deadline + 660, f"no beat from the main process: {row.queues}"
            time.sleep(0.5)
            with session_scope(settings.database_url) as s:
                row = s.get(Worker, name)
        assert row.heartbeat_at is not None
        assert "-Q cuda0 names a device: pinned to cpu as " + name in plain.log.read_text(errors="replace")
    finally:
        stack.stop()
