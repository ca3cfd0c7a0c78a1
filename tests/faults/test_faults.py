"""Whatever dies, every candidate ends up in SQL exactly once with a final status and the batch closes.

Faults are real: processes are killed with signals, Redis is restarted, queue messages are removed or
duplicated in Redis itself. Fault markers in prompts (farm/faults.py, enabled by FARM_FAULTS=1 for this farm
only) place a failure inside a real stage. Case 3 (SIGTERM during a slice) is in tests/test_worker.py and
case 5 (a model error on one candidate) in tests/tasks/test_end_to_end.py; case 9 needs PostgreSQL and is in
test_postgres_faults.py.
"""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest

from farm import dispatch
from farm.db import Batch, Item, session_scope, utcnow
from tests.faults.conftest import FaultFarm, manifest

pytestmark = pytest.mark.slow


def _generating(farm: FaultFarm, batch_id: str, index: int) -> bool:
    return any(
        c.index == index and c.stage_attempts.get("generate") == 1 and c.status == "pending"
        for c in farm.candidates(batch_id)
    )


def _child_running(farm: FaultFarm, task: str, candidate_suffix: str = "") -> int | None:
    """The pid of the pool child whose heartbeat says it runs ``task`` on a slice starting there."""
    for w in farm.workers():
        if w.current and w.current.startswith(task) and candidate_suffix in w.current:
            return w.pid
    return None


def test_sigkill_of_a_worker_child_during_generate_requeues_the_slice(farm: FaultFarm):
    batch_id = farm.submit(manifest("kill-child", ["a slow harbour [[fault:generate:sleep:0]]"]))
    farm.wait_until(lambda: _generating(farm, batch_id, 0), what="generate of candidate 0")
    first = f"{batch_id}-00000-000 "
    farm.wait_until(lambda: _child_running(farm, "farm.generate", first) is not None, what="a busy child")
    pid = _child_running(farm, "farm.generate", first)
    os.kill(pid, signal.SIGKILL)
    assert farm.wait(batch_id) == "done"
    rows = farm.assert_accounted_for(batch_id, 4)
    first_slice = [c for c in rows if c.index in (0, 1)]
    assert all(c.stage_attempts["generate"] == 2 for c in first_slice), [
        c.stage_attempts for c in first_slice
    ]
    assert all(c.status != "failed" for c in first_slice)


# validate: the worker dies holding a later stage of its chain, whose message waits in its own queue
# (cuda0@host); generate is not repeated, whichever way the stage comes back (the restarted worker, or the
# reaper once the lease ran out).
@pytest.mark.parametrize("stage", ["generate", "validate"])
def test_sigkill_of_a_whole_worker_loses_nothing(farm: FaultFarm, stage: str):
    batch_id = farm.submit(
        manifest(f"kill-worker-{stage}", [f"a slow lighthouse [[fault:{stage}:sleep:0]]", "a quiet bay"])
    )
    first = f"farm.{stage} {batch_id}-00000-000 "
    farm.wait_until(
        lambda: any(w.current and w.current.startswith(first) for w in farm.workers()),
        what=f"the worker in {stage} of candidate 0",
    )
    busy = [w for w in farm.workers() if w.current and w.current.startswith(first)]
    assert len(busy) == 1, [(w.name, w.current) for w in farm.workers()]
    queue = busy[0].queue
    proc = farm.stack.proc(f"worker-{queue}")
    os.killpg(proc.popen.pid, signal.SIGKILL)
    proc.popen.wait()
    # The supervisor in wait() brings the worker back, as systemd or `farm up` would.
    assert farm.wait(batch_id, timeout=300) == "done"
    rows = farm.assert_accounted_for(batch_id, 8)
    if stage == "generate":
        assert max(c.stage_attempts.get("generate", 0) for c in rows) >= 2
    else:
        assert all(c.stage_attempts["generate"] == 1 for c in rows), "only the killed stage is repeated"
        # The slice of candidates 0 and 1 (FARM_SLICE_SIZE=2) was in validate when its worker died.
        killed = [
            c for c in rows if c.item_id.endswith("-00000") and c.index < 2 and "validate" in c.stage_attempts
        ]
        assert killed and all(c.stage_attempts["validate"] >= 2 for c in killed), [
            c.stage_attempts for c in killed
        ]
    farm.wait_ready()


def test_a_redis_restart_mid_batch_loses_no_queued_work(farm: FaultFarm):
    batch_id = farm.submit(manifest("redis-restart", [f"harbour view {i}" for i in range(6)]))
    farm.wait_until(lambda: any(c.status != "pending" for c in farm.candidates(batch_id)), what="progress")
    farm.stack.redis.stop()
    time.sleep(1.0)
    farm.stack.redis.start()
    assert farm.wait(batch_id, timeout=300) == "done"
    farm.assert_accounted_for(batch_id, 24)


# validate is a task of its own after moderate's in the slice's chain: a kill redelivers farm.validate alone.
@pytest.mark.parametrize("stage", ["generate", "validate"])
def test_a_poison_candidate_is_failed_after_the_attempt_cap_and_the_item_still_ranks(farm: FaultFarm, stage):
    batch_id = farm.submit(manifest(f"poison-{stage}", [f"a cursed teapot [[fault:{stage}:kill:1]]"]))
    assert farm.wait(batch_id, timeout=400) == "done"
    rows = {c.index: c for c in farm.assert_accounted_for(batch_id, 4)}
    poison = rows[1]
    assert poison.status == "failed" and "gave up after FARM_MAX_ATTEMPTS=3" in poison.error
    assert poison.stage == stage and poison.stage_attempts[stage] == 4
    assert all(n == 1 for st, n in poison.stage_attempts.items() if st != stage), poison.stage_attempts
    assert rows[0].status in ("passed", "rejected"), "its slice-mate finished on the one-by-one retry"
    assert all(rows[i].status in ("passed", "rejected") for i in (2, 3))
    item = farm.items(batch_id)[0]
    assert item.winners and poison.id not in item.winners
    farm.wait_ready()


def _hold_slices_then(farm: FaultFarm, text: str, mutate) -> str:
    """Submit with every worker drained, change the queued slice messages in Redis, then let them run."""
    farm.drain_all()
    try:
        batch_id = farm.submit(text)
        total_slices = sum((c + 1) // 2 for c in [4] * len(farm.items(batch_id)))
        farm.wait_until(lambda: farm.slices_waiting() == total_slices, what="all slices queued")
        mutate(farm.redis())
    finally:
        farm.undrain_all()
    return batch_id


def _slices_key(client) -> bytes:
    return next(k for k in client.keys("slices*") if client.type(k) == b"list" and client.llen(k))


def test_a_lost_header_message_is_re_sent_by_the_reaper(farm: FaultFarm):
    batch_id = _hold_slices_then(
        farm,
        manifest("lost-header", ["a red kite", "a blue kite"]),
        lambda r: r.rpop(_slices_key(r)),
    )
    assert farm.wait(batch_id, timeout=300) == "done"
    farm.assert_accounted_for(batch_id, 8)
    assert sum(it.resends for it in farm.items(batch_id)) == 1


def test_the_same_task_delivered_twice_is_recorded_once_and_the_chord_fires_once(farm: FaultFarm):
    def duplicate(r):
        key = _slices_key(r)
        r.lpush(key, r.lindex(key, 0))

    batch_id = _hold_slices_then(farm, manifest("twice", ["a green kite", "a grey kite"]), duplicate)
    assert farm.wait(batch_id, timeout=300) == "done"
    rows = farm.assert_accounted_for(batch_id, 8)
    assert farm.batch(batch_id).items_done == 2
    assert max(c.stage_attempts.get("generate", 0) for c in rows) <= 2
    assert sum(it.resends for it in farm.items(batch_id)) == 0
    winners = [c for c in rows if c.is_winner]
    assert len(winners) == 2


def test_a_model_load_slower_than_celerys_child_start_timeout_does_not_loop(farm: FaultFarm):
    proc = farm.stack.restart_worker("cuda1", {"FARM_FAULT_SLOW_LOAD": "8"})
    farm.wait_ready()
    batch_id = farm.submit(manifest("slow-load", [f"slow load {i}" for i in range(4)]))
    assert farm.wait(batch_id, timeout=300) == "done"
    farm.assert_accounted_for(batch_id, 16)
    log = proc.log.read_text(errors="replace")
    assert "Timed out waiting for UP message" not in log
    assert proc.popen.poll() is None and proc.restarts == 0
    cuda1 = [w for w in farm.workers() if w.queue == "cuda1"]
    assert cuda1 and set(cuda1[0].models.values()) == {1}


def test_work_stranded_in_the_queue_of_a_device_that_never_returns_is_re_sent(farm: FaultFarm):
    batch_id = farm.submit(manifest("gone-device", [f"an empty road {i}" for i in range(6)]))
    farm.wait_until(
        lambda: any(c.device == "cuda1" for c in farm.candidates(batch_id)), what="cuda1 generating"
    )
    proc = farm.stack.proc("worker-cuda1")
    os.killpg(proc.popen.pid, signal.SIGKILL)
    proc.popen.wait()
    farm.stack.procs.remove(proc)
    try:
        assert farm.wait(batch_id, timeout=400, supervise=False) == "done"
        farm.assert_accounted_for(batch_id, 24)
    finally:
        farm.stack.start_worker("cuda1")
        farm.wait_ready()


def _written_not_sent(farm: FaultFarm, name: str, prompts: list[str]) -> str:
    """A batch written to SQL as `farm submit` writes it, with no message sent for it."""
    text = manifest(name, prompts)
    planned, items = dispatch.plan(text, settings=farm.settings)
    return dispatch.create_batch(planned, items, text, settings=farm.settings).batch_id


def test_a_dispatch_that_stopped_part_way_is_sent_again_by_the_reaper(farm: FaultFarm):
    # farm.dispatch_batch sent item 0 and failed before item 1 (a database error that outlasted its
    # retries): the batch is running, item 1 still pending, and no message anywhere will send it.
    batch_id = _written_not_sent(farm, "half-dispatched", ["a grey heron", "a white heron"])
    first, _second = farm.items(batch_id)
    ids = sorted(c.id for c in farm.candidates(batch_id) if c.item_id == first.id)
    with session_scope(farm.settings.database_url) as s:
        batch = s.get(Batch, batch_id)
        batch.status, batch.created_at = "running", utcnow() - timedelta(seconds=60)
        s.get(Item, first.id).status = "running"
    dispatch.send_item(batch_id, first.id, ids, settings=farm.settings, priority=0)
    assert farm.wait(batch_id, timeout=180) == "done"
    farm.assert_accounted_for(batch_id, 8)
    assert [it.resends for it in farm.items(batch_id)] == [0, 0], "dispatched, not re-sent as stalled"


def test_a_cancel_whose_rank_messages_were_lost_is_closed_by_the_reaper(farm: FaultFarm):
    # `farm cancel` flipped the batch to cancelling; the ranks it sends to close unsent items were lost.
    batch_id = _written_not_sent(farm, "lost-cancel", ["a quiet pond", "a loud pond"])
    with session_scope(farm.settings.database_url) as s:
        s.get(Batch, batch_id).status = "cancelling"
    assert farm.wait(batch_id, timeout=120) == "cancelled"
    batch = farm.batch(batch_id)
    assert batch.items_done == batch.items_total == 2
    assert {it.status for it in farm.items(batch_id)} == {"cancelled"}
    assert {c.status for c in farm.candidates(batch_id)} == {"cancelled"}
