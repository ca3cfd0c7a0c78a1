"""Device workers under real conditions: two CPU-backed devices, placement, drain, SIGTERM."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter, defaultdict

import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import select

from farm import dispatch
from farm import worker as worker_module
from farm.artifacts import Handoff
from farm.broker import device_workers, local_queue, queue_length
from farm.celery_app import app
from farm.cli import cli
from farm.config import load_settings
from farm.db import Batch, Candidate, Worker, migrate, session_scope
from farm.worker import in_flight, sweep_handoff

pytestmark = pytest.mark.slow


def manifest(name: str, items: int, candidates: int = 4) -> str:
    prompts = "\n".join(f"  - prompt number {i}" for i in range(items))
    defaults = f"{{candidates: {candidates}, steps: 2, size: 64x64}}"
    return f"name: {name}\nmodel: tiny\ndefaults: {defaults}\nitems:\n{prompts}\n"


def candidates(settings, batch_id):
    with session_scope(settings.database_url) as s:
        return s.scalars(select(Candidate).where(Candidate.batch_id == batch_id)).all()


def wait_ready(queues=("cuda0", "cuda1"), timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(device_workers(app, q) for q in queues):
            return
        time.sleep(1)
    raise AssertionError("device workers did not answer ping")


def test_two_equal_devices_share_a_batch_and_finish_within_ten_percent_of_busy_time(
    settings, stack, run_batch
):
    wait_ready()
    batch_id = run_batch(manifest("balance", items=20))
    busy, end, slices = defaultdict(float), {}, Counter()
    for c in candidates(settings, batch_id):
        busy[c.device] += sum(t["s"] for t in c.timings.values())
        end[c.device] = max(end.get(c.device, c.updated_at), c.updated_at)
        slices[c.device] += 1
    assert set(busy) == {"cuda0", "cuda1"}, slices
    gap = abs((end["cuda0"] - end["cuda1"]).total_seconds())
    assert gap <= 0.10 * min(busy.values()), (gap, dict(busy))


def test_a_faster_device_takes_more_of_the_work(settings, stack, run_batch):
    stack.restart_worker("cuda1", {"FARM_FAULT_SLOW_GENERATE": "0.6"})
    try:
        wait_ready()
        batch_id = run_batch(manifest("fast-slow", items=12))
        per_device = Counter(c.device for c in candidates(settings, batch_id))
        assert per_device["cuda0"] > 1.5 * per_device["cuda1"], per_device
    finally:
        stack.restart_worker("cuda1")


def test_a_drained_device_takes_no_new_slices_until_undrained(settings, stack, run_batch):
    wait_ready()
    runner = CliRunner()
    result = runner.invoke(cli, ["drain", "cuda1"])
    assert result.exit_code == 0, result.output
    try:
        batch_id = run_batch(manifest("drained", items=6))
        assert {c.device for c in candidates(settings, batch_id)} == {"cuda0"}
    finally:
        assert runner.invoke(cli, ["undrain", "cuda1"]).exit_code == 0
    batch_id = run_batch(manifest("undrained", items=8))
    assert {c.device for c in candidates(settings, batch_id)} == {"cuda0", "cuda1"}


def test_drain_of_an_unknown_device_says_so():
    result = CliRunner().invoke(cli, ["drain", "cuda9"])
    assert result.exit_code != 0 and "no live worker serves cuda9" in result.output


def test_sigterm_finishes_the_slices_in_flight_then_exits_and_nothing_is_lost(settings, stack, wait_batch):
    wait_ready()
    done = dispatch.submit(manifest("sigterm", items=10), settings=settings)
    deadline = time.monotonic() + 300
    while not any(c.device == "cuda1" for c in candidates(settings, done.batch_id)):
        assert time.monotonic() < deadline, "cuda1 never started a slice"
        time.sleep(0.05)
    worker = stack.proc("worker-cuda1").popen
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(180) == 0
    assert in_flight(settings.database_url, "cuda1") == 0
    # Nor left queued: the device's queue, or its own, where the checks of the slices it generated wait.
    assert queue_length(app, "cuda1") == 0 and queue_length(app, local_queue("cuda1")) == 0
    stack.procs.remove(stack.proc("worker-cuda1"))
    try:
        assert wait_batch(done.batch_id) == "done"
        rows = candidates(settings, done.batch_id)
        assert len(rows) == 40 and len({c.id for c in rows}) == 40
        assert all(c.status in ("passed", "rejected", "failed") for c in rows)
        with session_scope(settings.database_url) as s:
            assert s.get(Batch, done.batch_id).items_done == 10
    finally:
        stack.start_worker("cuda1")


def _models_of(settings, queue: str) -> dict[str, int]:
    with session_scope(settings.database_url) as s:
        row = s.scalars(select(Worker).where(Worker.queue == queue)).one()
        return dict(row.models)


def _generator_loads(models: dict[str, int]) -> dict[str, int]:
    return {k.split(":")[1]: v for k, v in models.items() if k.startswith("generator:")}


def test_a_manifest_naming_another_generator_loads_it_on_demand_once(settings, stack, run_batch):
    wait_ready()
    runner = CliRunner()
    assert runner.invoke(cli, ["drain", "cuda1"]).exit_code == 0
    try:
        xl = manifest("xl", items=2).replace("model: tiny", "model: tiny-xl")
        run_batch(xl)
        run_batch(manifest("back-to-tiny", items=2))
        run_batch(xl.replace("name: xl", "name: xl-again"))
    finally:
        assert runner.invoke(cli, ["undrain", "cuda1"]).exit_code == 0
    assert _generator_loads(_models_of(settings, "cuda0")) == {"tiny": 1, "tiny-xl": 1}


def test_over_its_memory_budget_a_worker_evicts_the_least_recently_used_generator(settings, stack, run_batch):
    stack.restart_worker("cuda0", {"FARM_MODEL_BUDGET_MB": "1"})
    runner = CliRunner()
    try:
        wait_ready()
        assert runner.invoke(cli, ["drain", "cuda1"]).exit_code == 0
        run_batch(manifest("xl-budget", items=2).replace("model: tiny", "model: tiny-xl"))
        run_batch(manifest("tiny-budget", items=2))
        assert _generator_loads(_models_of(settings, "cuda0")) == {"tiny": 2, "tiny-xl": 1}, (
            "tiny (preloaded) made room for tiny-xl, then came back"
        )
    finally:
        assert runner.invoke(cli, ["undrain", "cuda1"]).exit_code == 0
        stack.restart_worker("cuda0")


def test_the_handoff_sweep_removes_only_old_images_whose_candidate_no_qc_task_will_read(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    monkeypatch.setenv("FARM_HANDOFF_DIR", str(tmp_path / "handoff"))
    monkeypatch.setenv("FARM_STALL_SECONDS", "60")
    own = load_settings()
    migrate(own.database_url)
    text = 'name: sweep\nmodel: tiny\ndefaults: {candidates: 4, steps: 1, size: 32x32}\nitems: ["a kite"]\n'
    manifest, items = dispatch.plan(text, settings=own)
    batch_id = dispatch.create_batch(manifest, items, text, settings=own).batch_id
    with session_scope(own.database_url) as s:
        ids = sorted(s.scalars(select(Candidate.id).where(Candidate.batch_id == batch_id)))
        statuses = dict(zip(ids, ["generated", "moderated", "pending", "failed"], strict=True))
        for c in s.scalars(select(Candidate).where(Candidate.batch_id == batch_id)):
            c.status = statuses[c.id]
    handoff = Handoff(own.handoff_dir)
    pixels = Image.new("RGB", (8, 8))
    names = [*ids, "gone-batch-00000-000"]  # the last: its batch was deleted
    for name in names:
        handoff.put(f"{batch_id}/{name}.png", pixels)
    young = ids[1]
    for name in names:
        if name != young:
            old = time.time() - 61
            os.utime(own.handoff_dir / f"{name}.npy", (old, old))

    real_scope = worker_module.session_scope

    def generated_again_meanwhile(*args, **kwargs):
        handoff.put(f"{batch_id}/{ids[2]}.png", pixels)  # while the sweep reads SQL
        return real_scope(*args, **kwargs)

    monkeypatch.setattr(worker_module, "session_scope", generated_again_meanwhile)
    removed = sweep_handoff(own)

    assert sorted(removed) == sorted([f"{ids[3]}.npy", "gone-batch-00000-000.npy"])
    left = sorted(p.stem for p in own.handoff_dir.glob("*.npy"))
    assert left == sorted([ids[0], young, ids[2]]), "waiting for its QC task, too young, or rewritten"
    monkeypatch.setattr(worker_module, "session_scope", real_scope)
    assert sweep_handoff(own) == []
