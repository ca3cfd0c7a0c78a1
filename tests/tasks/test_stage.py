"""run_stages on real SQL with stand-in stage work (no models are needed to pin down the order of writes)."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from datetime import timedelta
from types import SimpleNamespace

import pytest
from sqlalchemy import event, select, update

from farm import dispatch, records
from farm.config import load_settings
from farm.db import READ_ONLY, Candidate, Worker, get_engine, migrate, session_scope, utcnow
from farm.tasks.lease import Lease, keep_renewing
from farm.tasks.runtime import Runtime
from farm.tasks.stage import Stage, run_stages

STAGE_NAMES = ("generate", "moderate", "validate", "score")
MANIFEST = 'name: stage\nmodel: tiny\ndefaults: {candidates: 3, steps: 1, size: 32x32}\nitems: ["a kite"]\n'


@pytest.fixture
def one_slice(monkeypatch, tmp_path) -> tuple[str, list[str]]:
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    migrate(settings.database_url)
    manifest, items = dispatch.plan(MANIFEST, settings=settings)
    done = dispatch.create_batch(manifest, items, MANIFEST, settings=settings)
    with session_scope(settings.database_url) as s:
        ids = sorted(s.scalars(select(Candidate.id).where(Candidate.batch_id == done.batch_id)))
    return settings.database_url, ids


@pytest.fixture
def rt(one_slice) -> Runtime:
    """The runtime a task's entry point would hand the stages, on the slice's settings."""
    return Runtime(load_settings())


def _rows(url: str, ids: list[str]) -> list[Candidate]:
    with session_scope(url) as s:
        return list(s.scalars(select(Candidate).where(Candidate.id.in_(ids)).order_by(Candidate.id)))


def _statuses(url: str, ids: list[str]) -> dict[str, str]:
    with session_scope(url) as s:
        return {c.id: c.status for c in s.scalars(select(Candidate).where(Candidate.id.in_(ids)))}


def test_a_settled_stage_is_written_after_the_next_stages_work_and_a_failed_side_effect_fails_its_candidate(
    one_slice, rt
):
    url, ids = one_slice
    events: list[str] = []

    def generate(rt, start, cands):
        events.append("generate")
        return {c.id: {"image_path": f"b/{c.id}.png"} for c in cands}

    def settle(rt, cands):
        events.append("settle")
        return {ids[1]: records.failure("generate", "could not store the image: disk full")}

    def moderate(rt, start, cands):
        events.append("moderate")
        # The next stage sees what generate made before it is written; SQL does not yet.
        assert [c.image_path for c in cands] == [f"b/{i}.png" for i in ids]
        assert set(_statuses(url, ids).values()) == {"pending"}
        return {c.id: {"verdict": "ok"} for c in cands}

    stages = [Stage("generate", generate, settle=settle), Stage("moderate", moderate)]
    run_stages(rt, SimpleNamespace(name="farm.generate"), {"candidates": ids}, stages)

    assert events == ["generate", "moderate", "settle"]
    with session_scope(url) as s:
        rows = {c.id: c for c in s.scalars(select(Candidate).where(Candidate.id.in_(ids)))}
    failed = rows[ids[1]]
    assert (failed.status, failed.stage) == ("failed", "generate")
    assert failed.error == "generate: could not store the image: disk full"
    assert failed.verdict is None, "its moderation result was dropped with it"
    for cid in (ids[0], ids[2]):
        row = rows[cid]
        assert (row.status, row.image_path, row.verdict) == ("moderated", f"b/{cid}.png", "ok")
        assert row.stage_attempts == {"generate": 1, "moderate": 1}
        assert set(row.timings) == {"generate", "moderate"}


def _four_stages(events: list[str], *, score_dies: bool = False) -> list[Stage]:
    """The real stages' shape: generate settles, moderate checks within its write, validate holds."""

    def work(name: str, result: dict):
        def run(rt, start, cands):
            events.append(name)
            if name == "score" and score_dies:
                raise SystemExit("the worker died")  # not an Exception: nothing catches it, as a SIGKILL
            return {c.id: dict(result) for c in cands}

        return run

    def within(rt, start, conn, written):
        rows = conn.execute(select(Candidate.status).where(Candidate.id.in_(written))).scalars()
        events.append(f"within:{len(written)}:{','.join(sorted(set(rows)))}")

    return [
        Stage("generate", work("generate", {"image_path": "x.png"}), settle=lambda rt, cands: {}),
        Stage("moderate", work("moderate", {"pdq_hash": "ab"}), within=within),
        Stage("validate", work("validate", {"alignment": 0.5}), hold=True),
        Stage("score", work("score", {"preference": 0.1, "score": 0.2})),
    ]


def test_a_slice_takes_three_write_transactions_and_moderates_check_sees_its_own_rows(one_slice, rt):
    url, ids = one_slice
    writes, events = [], []
    event.listen(
        get_engine(url),
        "begin",
        lambda conn: None if conn.get_execution_options().get(READ_ONLY) else writes.append(conn),
    )
    run_stages(rt, SimpleNamespace(name="farm.generate"), {"candidates": ids}, _four_stages(events))

    assert len(writes) == 3, "the delivery count, generate + moderate, validate + score"
    assert events == ["generate", "moderate", "within:3:moderated", "validate", "score"]
    with session_scope(url) as s:
        rows = list(s.scalars(select(Candidate).where(Candidate.id.in_(ids))))
    assert {(c.status, c.image_path, c.pdq_hash, c.alignment, c.score) for c in rows} == {
        ("scored", "x.png", "ab", 0.5, 0.2)
    }
    assert all(c.stage_attempts == {st: 1 for st in STAGE_NAMES} for c in rows)


def test_a_crash_in_score_repeats_validate_which_held_its_results_and_nothing_before_it(one_slice, rt):
    url, ids = one_slice
    events: list[str] = []
    with pytest.raises(SystemExit):
        run_stages(
            rt,
            SimpleNamespace(name="farm.generate"),
            {"candidates": ids},
            _four_stages(events, score_dies=True),
        )
    assert set(_statuses(url, ids).values()) == {"moderated"}, "validate's results went with score's"

    events.clear()
    run_stages(rt, SimpleNamespace(name="farm.generate"), {"candidates": ids}, _four_stages(events))
    assert "generate" not in events and "moderate" not in events
    assert events.count("validate") == 3, "redelivered: one candidate at a time"
    with session_scope(url) as s:
        rows = list(s.scalars(select(Candidate).where(Candidate.id.in_(ids))))
    assert {c.status for c in rows} == {"scored"}
    assert all(c.stage_attempts == {"generate": 1, "moderate": 1, "validate": 2, "score": 1} for c in rows)


def _losing_moderate(events: list[str], lose: set[str], *, every_time: bool = False) -> list[Stage]:
    """The four stages, with a moderate that finds the images of ``lose`` nowhere (once, or every time)."""
    stages = _four_stages(events)
    plain = stages[1].work

    def moderate(rt, start, cands):
        out = plain(rt, start, cands)
        for c in cands:
            if c.id in lose:
                out[c.id] = records.image_lost(c)
                if not every_time:
                    lose.discard(c.id)
        return out

    stages[1] = Stage("moderate", moderate, within=stages[1].within)
    return stages


def test_a_candidate_whose_image_was_lost_is_generated_again_in_the_same_task(one_slice, rt):
    url, ids = one_slice
    events: list[str] = []
    worked = run_stages(
        rt, SimpleNamespace(name="farm.generate"), {"candidates": ids}, _losing_moderate(events, {ids[1]})
    )

    assert events.count("generate") == 2 and events.count("score") == 2
    assert [c.status for c in worked] == ["scored"] * 3
    rows = {c.id: c for c in _rows(url, ids)}
    assert {(c.status, c.image_path, c.score) for c in rows.values()} == {("scored", "x.png", 0.2)}
    assert rows[ids[1]].stage_attempts == {st: 1 for st in STAGE_NAMES}, "one delivery; moderate started over"


def test_an_image_lost_again_in_the_repeat_leaves_its_candidate_for_generate_and_the_task_ends(one_slice, rt):
    url, ids = one_slice
    events: list[str] = []
    stages = _losing_moderate(events, {ids[0]}, every_time=True)
    worked = run_stages(rt, SimpleNamespace(name="farm.generate"), {"candidates": ids}, stages)

    assert events.count("generate") == 2, "generated again once in this task, not in a loop"
    assert {c.id: c.status for c in worked} == {ids[0]: "pending", ids[1]: "scored", ids[2]: "scored"}
    lost = _rows(url, [ids[0]])[0]
    assert (lost.image_path, lost.recipe, lost.stage) == (None, {}, None), "the row names no missing image"


def test_a_run_whose_lease_was_taken_over_mid_stage_writes_nothing_and_the_new_holder_writes_once(
    one_slice, rt
):
    url, ids = one_slice
    events: list[str] = []
    other: list[records.StageStart] = []

    def paused_past_its_lease(rt, start, cands):
        # This run stopped here past its lease: the reaper moved the generation on and another worker took
        # the slice (it has not written yet); then this run goes on.
        with session_scope(url) as s:
            s.execute(update(Candidate).where(Candidate.id.in_(ids)).values(lease_expires_at=utcnow()))
        assert sorted(r.id for r in records.take_expired_leases(url, utcnow() + timedelta(seconds=1))) == ids
        claim = records.Claim("cuda1@elsewhere pid 2", 60)
        other.append(records.begin_stages(url, ids, ("generate",), max_attempts=3, claim=claim))
        rt.lease._renewed -= 3600  # its clock ran on while it was stopped: the next check renews first
        events.append("taken over")
        return {c.id: {"image_path": "old.png", "worker": "cuda0@here"} for c in cands}

    generate = Stage("generate", paused_past_its_lease, settle=lambda rt, cands: {})
    stages = [generate, *_four_stages(events)[1:]]
    run_stages(rt, SimpleNamespace(name="farm.generate"), {"candidates": ids}, stages)

    assert events == ["taken over"], "nothing after generate ran: the slice was dropped"
    assert rt.lease is None
    rows = _rows(url, ids)
    assert {(c.status, c.image_path, c.worker, c.lease_token) for c in rows} == {("pending", None, None, 3)}
    new = other[0]
    (written,) = records.apply_stages(
        url,
        [
            records.StageWrite(
                "generate",
                {c.id: {"image_path": "new.png", "worker": "cuda1@elsewhere"} for c in new.todo},
                {"s": 0.1},
                started={c.id: c for c in new.todo},
                keeps=frozenset(),
            )
        ],
    )
    assert len(written) == 3
    rows = _rows(url, ids)
    assert {(c.status, c.image_path, c.worker) for c in rows} == {("generated", "new.png", "cuda1@elsewhere")}
    assert all(c.stage_attempts == {"generate": 2} and c.lease_expires_at is None for c in rows)


def test_the_process_running_a_slice_renews_its_lease_and_its_worker_row_from_a_thread_of_its_own(
    one_slice, rt
):
    url, ids = one_slice
    rt.settings = replace(rt.settings, heartbeat_seconds=1, lease_seconds=3)
    rt.heartbeat.write("farm.generate")  # the worker's row, as its first task writes it
    start = records.begin_stages(url, ids, ("generate",), max_attempts=3, claim=rt.claim())
    assert rt.claim().owner.endswith(f" pid {os.getpid()}")
    taken = {c.id: c.lease_expires_at for c in _rows(url, ids)}
    with session_scope(url) as s:
        beat = s.get(Worker, rt.name).heartbeat_at
    rt.lease = Lease(rt, ids, start.token)
    keep_renewing(rt)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rows = _rows(url, ids)
            if all(c.lease_expires_at > taken[c.id] for c in rows):
                break
            time.sleep(0.2)
        assert all(c.lease_expires_at > taken[c.id] for c in rows), "renewed while the task works"
        with session_scope(url) as s:
            assert s.get(Worker, rt.name).heartbeat_at > beat, "the worker row beats from this process"
    finally:
        rt.lease = None
    assert rt.lease is None and rt.renewer.is_alive()


def test_a_slice_dates_its_lease_from_before_the_transaction_that_took_it(one_slice, rt, monkeypatch):
    """Review F8: the lease's expiry counts from the clock read inside the transaction that took it, and
    that transaction may then wait on row locks (PostgreSQL) before it commits. The run dated its lease
    when it built it, after the commit, so ``keep`` trusted a lease older than it assumed; it dates it from
    before the transaction began."""
    from farm.tasks import stage as stage_module

    url, ids = one_slice
    write, read = records._write_guarded, []

    def waits_for_locks(conn, rows, one_by_one=False):
        if not read:  # the first write is the lease's: its expiry was read, then the update waits
            read.append(time.monotonic())
            time.sleep(0.05)
        return write(conn, rows, one_by_one=one_by_one)

    stamps: list[float] = []

    class Stamped(Lease):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            stamps.append(self._renewed)

    monkeypatch.setattr(records, "_write_guarded", waits_for_locks)
    monkeypatch.setattr(stage_module, "Lease", Stamped)
    run_stages(rt, SimpleNamespace(name="farm.generate"), {"candidates": ids}, _four_stages([]))
    assert len(stamps) == 1 and stamps[0] <= read[0], "dated no later than its expiry was read"
