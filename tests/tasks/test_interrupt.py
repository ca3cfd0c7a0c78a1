"""The cancel flag and step watch a generating slice calls after every denoising step (farm.tasks.interrupt):
how often they read SQL and write progress, on a fake clock, and the flag read from a real database."""

from __future__ import annotations

from sqlalchemy import update

from farm import records
from farm.db import Batch, session_scope
from farm.states import BatchStatus
from farm.tasks.interrupt import CANCEL_CHECK_S, CancelFlag, SliceCancelled, StepWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Reads:
    """A batch-status read that counts its calls, answering ``stopped``."""

    def __init__(self, stopped: bool = False) -> None:
        self.stopped = stopped
        self.calls = 0

    def __call__(self, batch_id: str) -> bool:
        self.calls += 1
        return self.stopped


def test_the_flag_reads_sql_at_most_once_per_250_ms() -> None:
    clock, read, at = Clock(), Reads(), []
    flag = CancelFlag(lambda b: at.append(clock.now) or read(b), clock=clock)
    flag.seed("b1", False)
    start = clock.now
    for _ in range(1000):  # ten seconds of 10 ms steps
        clock.now += 0.01
        assert flag("b1") is False
    assert 30 <= read.calls <= 10 / CANCEL_CHECK_S and flag.reads == read.calls
    assert at[0] - start >= CANCEL_CHECK_S - 1e-9
    assert all(b - a >= CANCEL_CHECK_S - 1e-9 for a, b in zip(at, at[1:], strict=False))


def test_a_slice_shorter_than_the_check_interval_reads_and_writes_nothing() -> None:
    """A batch that is not cancelled pays nothing visible: a fast model's slice (here 20 steps of 10 ms) goes
    by on the status its stage's start read, and reports no progress."""
    clock, read, reported = Clock(), Reads(), []
    flag = CancelFlag(read, clock=clock)
    flag.seed("b1", False)
    watch = StepWatch(flag, "b1", lambda s, n: reported.append((s, n)))
    for step in range(1, 21):
        clock.now += 0.01
        watch(step, 20)
    assert read.calls == 0 and reported == []


def test_most_steps_of_a_long_slice_return_without_a_read() -> None:
    clock, read = Clock(), Reads()
    flag = CancelFlag(read, clock=clock)
    flag.seed("b1", False)
    watch = StepWatch(flag, "b1")
    for step in range(1, 301):
        clock.now += 0.02
        watch(step, 300)
    assert read.calls <= 300 * 0.02 / CANCEL_CHECK_S + 1 < 300 / 10


def test_the_watch_stops_the_slice_at_the_first_step_after_a_read_sees_the_cancel() -> None:
    clock, read = Clock(), Reads()
    flag = CancelFlag(read, clock=clock)
    flag.seed("b1", False)
    watch = StepWatch(flag, "b1")
    for step in range(1, 11):
        clock.now += 0.1
        watch(step, 400)
    read.stopped = True  # the cancel commits
    stopped_at = None
    for step in range(11, 400):
        clock.now += 0.1
        try:
            watch(step, 400)
        except SliceCancelled as stop:
            stopped_at = stop.step
            assert (stop.batch_id, stop.steps) == ("b1", 400)
            break
    assert stopped_at is not None and stopped_at - 10 <= CANCEL_CHECK_S / 0.1 + 1
    calls = read.calls
    for _ in range(5):  # a stopped batch stays stopped: no more reads
        clock.now += 1
        assert flag("b1") is True
    assert read.calls == calls


def test_progress_is_reported_at_most_once_a_second_and_not_in_the_first() -> None:
    clock, reported = Clock(), []
    flag = CancelFlag(Reads(), clock=clock)
    watch = StepWatch(flag, "b1", lambda s, n: reported.append((s, n, clock.now)))
    start = clock.now
    for step in range(1, 101):
        clock.now += 0.1  # ten seconds
        watch(step, 100)
    assert 9 <= len(reported) <= 10
    assert reported[0][2] - start >= 1.0
    assert all(b[2] - a[2] >= 1.0 for a, b in zip(reported, reported[1:], strict=False))
    assert [r[0] for r in reported] == sorted(r[0] for r in reported) and reported[-1][1] == 100


def test_a_failed_read_keeps_the_last_answer_and_tries_again_later(caplog) -> None:
    clock = Clock()
    answers = iter([RuntimeError("database away"), True])

    def read(_batch: str) -> bool:
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    flag = CancelFlag(read, clock=clock)
    flag.seed("b1", False)
    clock.now += 0.3
    assert flag("b1") is False and "database away" in caplog.text
    clock.now += 0.1
    assert flag("b1") is False  # not read again within the interval
    clock.now += 0.2
    assert flag("b1") is True


def test_another_batch_is_read_at_once() -> None:
    clock, read = Clock(), Reads()
    flag = CancelFlag(read, clock=clock)
    flag.seed("b1", False)
    assert flag("b2") is False and read.calls == 1


def test_batch_stopped_reads_the_batch_row(slice_ids) -> None:
    url, ids = slice_ids
    with session_scope(url) as s:
        batch_id = s.scalar(Batch.__table__.select().with_only_columns(Batch.id))
    assert records.batch_stopped(url, batch_id) is False
    for status, stopped in ((BatchStatus.RUNNING, False), (BatchStatus.CANCELLING, True)):
        with session_scope(url) as s:
            s.execute(update(Batch).where(Batch.id == batch_id).values(status=status))
        assert records.batch_stopped(url, batch_id) is stopped
