"""Stopping the farm's processes as an operator does: Ctrl-C, SIGTERM to `farm up` or its group, SIGKILL of
`farm up` or of one worker's main process. Real `farm up` and `farm worker` subprocesses on two CPU-backed
devices; "nothing left" is read from /proc (every live process whose environment names the stack's FARM_HOME).

Bounds are derived from settings with wide margins: FARM_DRAIN_TIMEOUT is raised here so that a stop cut
short by the old fixed 60 s kill, or by a drain timing out, cannot pass for a clean one.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from farm.procs import alive, children, cmdline, descendants, leftovers
from farm.stack import HURRY_S, Stack
from tests import pgutil

# Signals and processes do not depend on the database: CI runs these in its SQLite pass only.
pytestmark = pgutil.sqlite_pass_only

ROOT = Path(__file__).resolve().parent.parent
IN_FLIGHT = ("generated", "moderated", "validated")
#: A drain that has to time out takes this long: far beyond every bound asserted below.
DRAIN_TIMEOUT = 300
#: An idle stack stops in a few seconds (5.1 s measured for two devices); a stop that waits for a timeout
#: or a killed worker's reconnect loop takes a minute or more.
IDLE_STOP_S = 40


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "FARM_HOME": str(home),
        "FARM_DEVICES": "cuda0=cpu,cuda1=cpu",
        "FARM_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
        **extra,
    }
    env.pop("FARM_DATABASE_URL", None)  # this stack's own SQLite under its FARM_HOME, in either CI pass
    return env


def _gone(pids: list[int], timeout: float) -> list[int]:
    """Of ``pids``, those still alive (not zombies) after waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        running = [pid for pid in pids if alive(pid)]
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.1)


def _logs(home: Path) -> str:
    return "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-2500:]}"
        for log in sorted(home.glob("logs/*.log"))
    )


def _ready(home: Path, devices: tuple[str, ...], timeout: float = 300) -> None:
    """Every worker's Celery consumer is up and each device's pool child has written its row."""
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{home / 'farm.db'}")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            logs = [home / "logs" / f"worker-{d}.log" for d in devices] + [home / "logs" / "control.log"]
            if all(p.exists() and " ready." in p.read_text(errors="replace") for p in logs):
                try:
                    with engine.connect() as conn:
                        rows = conn.execute(text("select count(*) from workers")).scalar()
                except Exception:  # not migrated yet
                    rows = 0
                if rows >= len(devices):
                    return
            time.sleep(0.5)
    finally:
        engine.dispose()
    raise AssertionError(f"the stack did not come up in {timeout}s\n{_logs(home)}")


def _up(home: Path, *, terminal: bool = False, **extra: str) -> subprocess.Popen[str]:
    """`farm up` in a process group of its own, as a shell runs a foreground job; with ``terminal`` its output
    goes to a pseudo-terminal (the master end is ``proc.terminal``), which the test can hang up."""
    master = slave = None
    if terminal:
        master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-m", "farm", "up", "--no-web", "--no-flower"],
        env=_env(home, **extra),
        cwd=ROOT,
        stdout=slave if terminal else subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    proc.terminal = master  # type: ignore[attr-defined]
    if terminal:
        os.close(slave)
        seen = b""
        while b"Press Ctrl-C" not in seen:
            seen += os.read(master, 4096)
    else:
        for line in proc.stdout:
            if "Press Ctrl-C" in line:
                break
    _ready(home, ("cuda0", "cuda1"))
    return proc


def _kill_all(home: Path, proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in leftovers(home):
        os.kill(pid, signal.SIGKILL)


def _assert_drained_cleanly(home: Path) -> None:
    text = _logs(home)
    for device in ("cuda0", "cuda1"):
        log = (home / "logs" / f"worker-{device}.log").read_text(errors="replace")
        assert "drained; warm shutdown" in log, f"{device} did not drain\n{text}"
    for lost_broker in ("Trying again in", "IndexError", "Cannot connect to"):
        assert lost_broker not in text, f"a worker lost its broker while stopping\n{text}"


def _candidates(home: Path) -> list[tuple[str, str, str]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{home / 'farm.db'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("select id, status, stage_attempts from candidates")).all()
    finally:
        engine.dispose()
    return [(r[0], r[1], r[2] or "{}") for r in rows]


def _wait_for_a_slice(home: Path, before: dict[str, str] | None = None, timeout: float = 180) -> None:
    """Until a slice has started since ``before`` (the candidates' stage attempts then; none by default)."""
    before = before or {}
    deadline = time.monotonic() + timeout
    while not any(a != before.get(c, "{}") for c, _, a in _candidates(home)):
        assert time.monotonic() < deadline, _logs(home)
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, to_group, hangup",
    [(signal.SIGTERM, True, False), (signal.SIGTERM, False, False), (signal.SIGHUP, True, True)],
    ids=["sigterm-to-the-group", "sigterm-to-farm-up-alone", "terminal-hung-up"],
)
def test_a_stop_signal_stops_an_idle_farm_up_in_seconds_draining_workers_while_redis_is_up(
    tmp_path, signum, to_group, hangup
):
    home = tmp_path / "home"
    proc = _up(home, terminal=hangup)
    try:
        started = time.monotonic()
        if hangup:
            os.close(proc.terminal)  # the ssh session dropped: every later write to the terminal fails
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        out, _ = proc.communicate(timeout=DRAIN_TIMEOUT)
        took = time.monotonic() - started
        if not hangup:
            assert proc.returncode == 0, out
        assert took < IDLE_STOP_S, f"an idle stack took {took:.1f}s to stop\n{out}\n{_logs(home)}"
        _assert_drained_cleanly(home)
        assert not _gone(leftovers(home), 5), f"left running: {leftovers(home)}"
    finally:
        _kill_all(home, proc)


@pytest.mark.slow
def test_ctrl_c_on_a_busy_farm_up_records_the_slices_in_flight_and_a_second_ctrl_c_stops_at_once(tmp_path):
    from farm import dispatch
    from farm.config import load_settings

    home = tmp_path / "home"
    proc = _up(home, FARM_FAULTS="1", FARM_FAULT_SLOW_GENERATE="4")
    try:
        settings = load_settings(_env(home))
        manifest = "name: busy\nmodel: tiny\ndefaults: {candidates: 2, steps: 2, size: 64x64}\nitems:\n"
        manifest += "".join(f"  - prompt {i}\n" for i in range(12))
        dispatch.submit(manifest, settings=settings)
        _wait_for_a_slice(home)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=DRAIN_TIMEOUT)
        assert proc.returncode == 0, out
        rows = _candidates(home)
        assert not [c for c, s, _ in rows if s in IN_FLIGHT], f"slices left half done\n{out}"
        started = [c for c, s, a in rows if a != "{}"]
        assert started and all(s not in ("pending", *IN_FLIGHT) for c, s, a in rows if c in started)
        assert any(s == "pending" for _, s, _ in rows), "the batch should still have work queued"
        _assert_drained_cleanly(home)
        assert not _gone(leftovers(home), 5)

        proc = _up(home, FARM_FAULTS="1", FARM_FAULT_SLOW_GENERATE="30")
        _wait_for_a_slice(home, {c: a for c, _, a in rows})
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(1.0)
        second = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=DRAIN_TIMEOUT)
        took = time.monotonic() - second
        assert "again: stopping now" in out, out
        assert took < HURRY_S + 15, f"the second Ctrl-C took {took:.1f}s\n{out}"
        assert not _gone(leftovers(home), 10), f"left running: {leftovers(home)}"
    finally:
        _kill_all(home, proc)


@pytest.mark.slow
def test_sigkill_of_farm_up_leaves_no_process_of_its_stack(tmp_path):
    home = tmp_path / "home"
    proc = _up(home, FARM_QC="worker")
    try:
        stack = leftovers(home)
        assert len(stack) >= 9, "redis and its keeper, two workers with pool children and QC workers, control"
        proc.kill()
        proc.wait()
        left = _gone(stack, 30)
        assert not left, f"left running after SIGKILL of farm up: {left}\n{_logs(home)}"
        assert not leftovers(home)
    finally:
        _kill_all(home, proc)


@pytest.mark.slow
def test_sigkill_of_a_worker_main_process_ends_its_busy_pool_child_beat_and_qc_worker(tmp_path):
    from farm import dispatch
    from farm.config import load_settings

    home = tmp_path / "home"
    env = _env(home, FARM_QC="worker", FARM_FAULTS="1")
    settings = load_settings(env)
    stack = Stack(settings, env=env)
    try:
        stack.prepare()
        stack.start_worker("cuda0", {"FARM_FAULT_SLOW_GENERATE": "300"})  # a slice that takes minutes
        stack.start_control()
        _ready(home, ("cuda0",))
        device, control = stack.proc("worker-cuda0").popen.pid, stack.proc("control").popen.pid
        qc = next(pid for pid in children(device) if "--qc" in cmdline(pid))
        qc_child, control_children = children(qc), children(control)
        assert qc_child, "the QC worker's pool child"
        assert len(control_children) >= 3, "two pool children and the embedded beat"

        os.kill(qc, signal.SIGKILL)
        assert not _gone(qc_child, 30), "the QC worker's pool child outlived it"
        dispatch.submit("name: slow\nmodel: tiny\nitems: [a fox]\n", settings=settings)
        _wait_for_a_slice(home)
        busy = [pid for pid in children(device) if "--qc" not in cmdline(pid)]
        restarted_qc = [pid for pid in children(device) if "--qc" in cmdline(pid)]
        os.kill(device, signal.SIGKILL)
        left = _gone(busy + restarted_qc, 30)
        assert not left, f"outlived the device worker: {[(pid, cmdline(pid)) for pid in left]}"
        os.kill(control, signal.SIGKILL)
        left = _gone(control_children, 30)
        assert not left, f"outlived the control worker: {[(pid, cmdline(pid)) for pid in left]}"
        redis = {stack.redis.process.pid, *descendants(stack.redis.process.pid)}
        orphans = set(leftovers(home)) - redis
        assert not orphans, f"orphans: {[(pid, cmdline(pid)) for pid in orphans]}"
    finally:
        stack.stop(30)
    assert not _gone(leftovers(home), 10)
