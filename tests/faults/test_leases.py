"""Leases: a slice whose worker process was killed or paused is re-sent once its lease runs out, and a paused
holder that comes back writes nothing (farm.tasks.lease).

A farm of its own on the default FARM_TASK_TIME_LIMIT, FARM_VISIBILITY_TIMEOUT (3600 s) and
FARM_STALL_SECONDS (1920 s): neither Celery's redelivery nor the stall reaper comes within a test's time, so
only the lease can recover the slice. The lease's own settings are shortened with the same logic (the lease
is six heartbeats, derived as by default; the reaper runs every few seconds instead of every minute) so a
test waits seconds, not minutes; the bound each test asserts is derived from them. The measured recovery on
the default settings is in docs/OPERATIONS.md.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.faults.conftest import FaultFarm, manifest

pytestmark = pytest.mark.slow

LEASE_ENV = {
    "FARM_TASK_TIME_LIMIT": "1800",
    "FARM_VISIBILITY_TIMEOUT": "3600",
    "FARM_STALL_SECONDS": "1920",
    "FARM_HEARTBEAT_SECONDS": "3",
    "FARM_REAPER_INTERVAL": "3",
    "FARM_FAULT_SLEEP_S": "8",
}
#: What a slice takes to run again on a loaded two-core test machine (a model load included), with room.
RUN_MARGIN_S = 240.0


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultFarm]:
    f = FaultFarm(tmp_path_factory.mktemp("leasefarm"), LEASE_ENV)
    assert f.settings.lease_seconds == 6 * f.settings.heartbeat_seconds, "derived as the default is"
    try:
        f.start()
        yield f
    finally:
        f.close()


def _bound(farm: FaultFarm) -> float:
    """The slice is re-sent once its lease has run out and the reaper has run, then runs again."""
    return farm.settings.lease_seconds + farm.settings.reaper_interval + RUN_MARGIN_S


def _holder(farm: FaultFarm, batch_id: str) -> tuple[str, int]:
    """The device queue and the pool child pid of the worker generating candidate 0 (asleep in generate)."""
    first = f"farm.generate {batch_id}-00000-000 "

    def busy():
        return [w for w in farm.workers() if w.current and w.current.startswith(first)]

    farm.wait_until(
        lambda: (
            bool(busy())
            and any(
                c.index == 0 and c.status == "pending" and c.stage_attempts.get("generate") == 1
                for c in farm.candidates(batch_id)
            )
        ),
        what="a worker generating candidate 0 (its lease taken with that count)",
    )
    (worker,) = busy()
    return worker.queue, worker.pid


def _slow_item(farm: FaultFarm, name: str) -> str:
    """One item of two slices; the slice of candidates 0 and 1 sleeps in generate on its first delivery."""
    return farm.submit(manifest(name, ["a slow harbour [[fault:generate:sleep:0]]"]))


def _first_slice(farm: FaultFarm, batch_id: str) -> list:
    return [c for c in farm.candidates(batch_id) if c.index in (0, 1)]


def _checks_taken(c) -> int:
    """Lease generations taken after generate: each stage task after it (moderate, validate, score) that
    found the candidate at its input took the next one; a candidate rejected on the way took fewer."""
    return sum(n for stage, n in c.stage_attempts.items() if stage != "generate")


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_sigkill_of_a_device_workers_main_process_mid_slice_is_recovered_by_the_lease(farm: FaultFarm):
    batch_id = _slow_item(farm, "lease-kill-main")
    queue, child = _holder(farm, batch_id)
    proc = farm.stack.proc(f"worker-{queue}")
    os.kill(proc.popen.pid, signal.SIGKILL)
    proc.popen.wait()
    t0 = time.monotonic()
    # Celery ties its pool child to the main process (PR_SET_PDEATHSIG): the child and its slice die with
    # it. Made sure of here, so the test never depends on how fast the kernel delivers that.
    _kill(child)
    try:
        assert farm.wait(batch_id, timeout=_bound(farm)) == "done"  # the supervisor restarts the worker
        elapsed = time.monotonic() - t0
    finally:
        _killpg(proc.popen.pid)
    rows = farm.assert_accounted_for(batch_id, 4)
    assert elapsed < _bound(farm)
    for c in _first_slice(farm, batch_id):
        assert c.stage_attempts["generate"] == 2, c.stage_attempts
        assert c.lease_token == 3 + _checks_taken(c), (
            "taken, moved on by the reaper, taken by the re-sent slice's generate, then by each check",
            c.lease_token,
            c.stage_attempts,
        )
        assert f"pid {child} " not in f"{c.lease_owner} " and c.lease_expires_at is None
    assert all(c.lease_expires_at is None for c in rows), "every settled candidate released its lease"
    assert [it.resends for it in farm.items(batch_id)] == [0], "a lease re-send is not a stall re-send"
    farm.wait_ready()


def test_sigkill_of_the_pool_child_hands_its_lease_to_the_requeued_slice_at_once(farm: FaultFarm):
    batch_id = _slow_item(farm, "lease-kill-child")
    _queue, child = _holder(farm, batch_id)
    os.kill(child, signal.SIGKILL)
    assert farm.wait(batch_id, timeout=_bound(farm)) == "done"
    farm.assert_accounted_for(batch_id, 4)
    for c in _first_slice(farm, batch_id):
        assert c.stage_attempts["generate"] == 2, c.stage_attempts
        # Celery requeued the message (task_reject_on_worker_lost); its delivery saw the dead child's lease
        # held by a process of this host that is gone and took it then, not after it ran out. Each stage task
        # after generate took the next generation.
        assert c.lease_token == 2 + _checks_taken(c), (c.lease_token, c.lease_owner, c.stage_attempts)
        assert f"pid {child} " not in f"{c.lease_owner} "
        assert c.lease_expires_at is None
    assert [it.resends for it in farm.items(batch_id)] == [0]
    farm.wait_ready()


@pytest.mark.parametrize("target", ["worker", "pool-child"])
def test_a_worker_paused_past_its_lease_has_its_late_writes_refused_and_drops_the_slice(
    farm: FaultFarm, target: str
):
    """SIGSTOP of the whole worker (main process and pool child), or of its pool child alone while the
    main process lives on (and answers pings): either way the slice's lease runs out, the other device
    records it, and the paused holder, continued, finds its lease taken over and writes nothing."""
    batch_id = _slow_item(farm, f"lease-pause-{target}")
    queue, child = _holder(farm, batch_id)
    proc = farm.stack.proc(f"worker-{queue}")
    log_start = proc.log.stat().st_size
    paused = lambda sig: os.killpg(proc.popen.pid, sig) if target == "worker" else os.kill(child, sig)  # noqa: E731
    paused(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        assert farm.wait(batch_id, timeout=_bound(farm)) == "done"
        assert time.monotonic() - t0 < _bound(farm)
        recorded = {c.id: c for c in farm.assert_accounted_for(batch_id, 4)}
        # Not before the lease ran out: its last renewal was at most a heartbeat before the stop.
        assert time.monotonic() - t0 > farm.settings.lease_seconds - farm.settings.heartbeat_seconds
    finally:
        paused(signal.SIGCONT)
    farm.wait_until(
        lambda: "lease lost" in proc.log.read_text(errors="replace")[log_start:],
        timeout=120,
        what="the paused holder to find its lease taken over",
    )
    farm.wait_until(lambda: not _busy(farm, child), timeout=120, what="the paused holder's task to end")
    after = {c.id: c for c in farm.assert_accounted_for(batch_id, 4)}
    new_holder = [q for q in farm.settings.devices if q != queue]
    for c in _first_slice(farm, batch_id):
        was = recorded[c.id]
        assert (c.status, c.image_path, c.worker, c.updated_at) == (
            was.status,
            was.image_path,
            was.worker,
            was.updated_at,
        ), "nothing written by the old holder"
        assert [c.device] == new_holder and c.worker.startswith(f"{new_holder[0]}@"), (c.device, c.worker)
        assert c.lease_token == 3 + _checks_taken(c) and c.stage_attempts["generate"] == 2, (
            c.lease_token,
            c.stage_attempts,
        )
    assert after.keys() == recorded.keys()
    log = proc.log.read_text(errors="replace")[log_start:]
    assert "Traceback" not in log, log[-3000:]
    farm.wait_ready()


def _busy(farm: FaultFarm, pid: int) -> bool:
    return any(w.pid == pid and w.current for w in farm.workers())
