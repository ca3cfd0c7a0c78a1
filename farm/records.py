"""What a stage delivery reads and writes of its candidates, with SQL Core: the attempt counts and lease it
takes (``begin_stages``), its guarded results (``apply_stages``), the lease's renewal, release and the
reaper's takeover, the near-duplicate hashes and flags, and the images the rows name. Ranking and top-up
rounds are in farm.rounds, the JSON views in farm.views.

Every write here is idempotent: stage results are applied only to candidates still at the status the stage
expects and the lease generation the delivery took, so redelivered tasks never write twice.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Row, bindparam, case, func, select, update

from farm.db import get_engine, utcnow
from farm.sql import BATCHES as _B
from farm.sql import CANDIDATES as _C
from farm.sql import ITEMS as _I
from farm.sql import reading as _reading
from farm.states import (
    BATCH_STOPPED,
    CANDIDATE_ABANDONED,
    CANDIDATE_FINAL,
    CANDIDATE_SETTLED,
    STAGE_INPUT,
    STAGE_OUTPUT,
    BatchStatus,
    CandidateStatus,
)

if TYPE_CHECKING:
    from farm.manifest import Manifest

T = TypeVar("T")

#: A write that rides in a stage's transaction (the worker's heartbeat).
Also = Callable[[Connection], object]

#: The stage a candidate at each status goes through next.
NEXT_STAGE = {status: stage for stage, status in STAGE_INPUT.items()}


class StagedCandidate(SimpleNamespace):
    """A candidate as a stage works on it: its row, read-only, attributes named like ``Candidate``'s columns
    (read with SQL Core: a stage runs this for every slice, and ORM loading cost more than the SQL)."""


@dataclass
class StageStart:
    """What a stage delivery should work on: the candidates at its input status, in slice order, with their
    item and batch rows."""

    batch: Row[Any]
    item: Row[Any]
    todo: list[StagedCandidate] = field(default_factory=list)
    cancelled: bool = False
    #: Candidates at a stage input that another live worker process holds, or took while this delivery read
    #: them (not started here).
    held_elsewhere: list[str] = field(default_factory=list)

    @cached_property
    def config(self) -> Manifest:
        """The batch's settings as the typed manifest, read once per delivery (a batch's settings never
        change) and shared by its stages."""
        from farm.manifest import stored_manifest

        return stored_manifest(self.batch.settings)

    @property
    def token(self) -> int | None:
        """The generation of the lease this delivery took on ``todo`` (None when it took none): every
        candidate in ``todo`` carries it."""
        return self.todo[0].lease_token if self.todo else None


#: The holder of a lease the reaper took over and is re-sending (``take_expired_leases``). Any delivery takes
#: it: it holds no work, only keeps the candidates from being lost between the takeover and the send.
REAPER = "reaper"


def lease_held(c: Any, now: datetime) -> bool:
    """Whether candidate ``c`` (a row or a ``Candidate``) is held by a worker process at ``now``: its lease is
    set, has not run out, and is not the reaper's hold (which any delivery may take)."""
    return c.lease_expires_at is not None and c.lease_expires_at > now and c.lease_owner != REAPER


@dataclass(frozen=True)
class Claim:
    """Who takes a slice's lease and for how long; ``gone(owner)`` says whether another lease's holder is
    known to be dead (a process of this host that no longer exists), so its lease need not run out first."""

    owner: str
    seconds: float
    gone: Callable[[str], bool] = lambda owner: False

    def takes(self, c: Row[Any], now: datetime) -> bool:
        """Whether candidate row ``c``'s lease is free for this claim: not held, run out, held by this very
        owner (an earlier run in the same process, which is over), or held by a process that is gone."""
        return not lease_held(c, now) or c.lease_owner == self.owner or self.gone(c.lease_owner or "")


#: What a stage reads of its batch: all but the manifest's text, which can be large.
_BATCH_COLUMNS = [c for c in _B.c if c.name != "manifest_yaml"]
#: Update candidate ``b_id`` only while it still has status ``b_status`` (what makes redeliveries harmless)
#: and lease generation ``b_token`` (what makes a holder whose lease was taken over harmless: fencing).
_GUARDED = update(_C).where(
    _C.c.id == bindparam("b_id"),
    _C.c.status == bindparam("b_status"),
    _C.c.lease_token == bindparam("b_token"),
)


class _Raced(Exception):
    """An executemany of guarded updates matched fewer rows than it was given, and cannot say which."""


def _write_guarded(conn: Connection, rows: list[dict[str, Any]], *, one_by_one: bool = False) -> set[str]:
    """The guarded updates of a slice; returns the ids whose update applied (the others had moved on: another
    delivery of the same slice got there first).

    Rows go in one executemany per set of columns (a statement per row cost about 0.2 ms each); when one
    matches fewer rows than it holds, ``_Raced`` rolls the transaction back for ``_in_transaction`` to run
    it again ``one_by_one``, which tells the rows apart. That happens only when deliveries of a slice race.
    """
    if one_by_one or not conn.dialect.supports_sane_multi_rowcount:
        return {row["b_id"] for row in rows if conn.execute(_GUARDED, row).rowcount}
    shapes: dict[frozenset[str], list[dict[str, Any]]] = {}
    for row in rows:
        shapes.setdefault(frozenset(row), []).append(row)
    for same in shapes.values():
        if conn.execute(_GUARDED, same).rowcount != len(same):
            raise _Raced
    return {row["b_id"] for row in rows}


def _in_transaction(url: str, write: Callable[[Connection, bool], T]) -> T:
    """``write(conn, one_by_one)`` in a transaction; run again one row at a time if its updates raced."""
    try:
        with get_engine(url).begin() as conn:
            return write(conn, False)
    except _Raced:
        with get_engine(url).begin() as conn:
            return write(conn, True)


def begin_stages(
    url: str,
    candidate_ids: list[str],
    stages: tuple[str, ...],
    *,
    max_attempts: int,
    also: Also | None = None,
    claim: Claim | None = None,
) -> StageStart:
    """Count this delivery against the stage each candidate enters next, pick the ones still to do and take
    their lease.

    ``stages`` are the stages this task runs, in order; a candidate is to do when its status is the input of
    one of them. A candidate started more than ``max_attempts`` times in the same stage (it keeps killing
    its worker) is failed here with the reason, so poison input cannot loop for ever. ``also`` (the
    worker's heartbeat) is written in the same transaction.

    The lease (``claim``) is taken in the same guarded updates, on the candidates whose lease is free: each
    gets the next generation (one token for the slice, above each one's last) as its fencing token, which
    every later write of this delivery must still match. A candidate another live process holds is left
    to it (``held_elsewhere``): a redelivered message meets its re-sent twin this way and does nothing.
    """
    claim = claim or Claim(owner=f"pid {os.getpid()}", seconds=60.0)
    return _in_transaction(
        url,
        lambda conn, one_by_one: _begin(conn, candidate_ids, stages, max_attempts, also, claim, one_by_one),
    )


def _begin(
    conn: Connection,
    candidate_ids: list[str],
    stages: tuple[str, ...],
    max_attempts: int,
    also: Also | None,
    claim: Claim,
    one_by_one: bool,
) -> StageStart:
    if also is not None:
        also(conn)
    rows = {r.id: r for r in conn.execute(select(_C).where(_C.c.id.in_(candidate_ids)))}
    missing = [i for i in candidate_ids if i not in rows]
    if missing:
        raise LookupError(f"candidates not in the database: {missing[:5]}")
    first = rows[candidate_ids[0]]
    item = conn.execute(select(_I).where(_I.c.id == first.item_id)).one()
    batch = conn.execute(select(*_BATCH_COLUMNS).where(_B.c.id == first.batch_id)).one()
    start = StageStart(batch=batch, item=item)
    if batch.status in BATCH_STOPPED:
        conn.execute(
            update(_C)
            .where(_C.c.id.in_(candidate_ids), _C.c.status.not_in(CANDIDATE_FINAL))
            .values(status=CandidateStatus.CANCELLED, lease_expires_at=None)
        )
        start.cancelled = True
        return start
    if batch.started_at is None:
        conn.execute(
            update(_B)
            .where(_B.c.id == batch.id, _B.c.started_at.is_(None))
            .values(
                started_at=utcnow(),
                status=case((_B.c.status == BatchStatus.QUEUED, BatchStatus.RUNNING), else_=_B.c.status),
            )
        )
    now = utcnow()
    due = [rows[cid] for cid in candidate_ids if NEXT_STAGE.get(rows[cid].status) in stages]
    start.held_elsewhere = [c.id for c in due if not claim.takes(c, now)]
    due = [c for c in due if c.id not in start.held_elsewhere]
    token = max((c.lease_token for c in due), default=0) + 1
    lease = {"lease_token": token, "lease_owner": claim.owner}
    expires = now + timedelta(seconds=claim.seconds)
    writes: list[dict[str, Any]] = []
    for c in due:
        stage = NEXT_STAGE[c.status]
        counts = {**(c.stage_attempts or {})}
        counts[stage] = counts.get(stage, 0) + 1
        row = {
            "b_id": c.id,
            "b_status": c.status,
            "b_token": c.lease_token,
            "stage_attempts": counts,
            "attempts": c.attempts + 1,
            **lease,
        }
        if counts[stage] > max_attempts:
            row.update(
                status=CandidateStatus.FAILED,
                stage=stage,
                error=f"{stage} was started {counts[stage] - 1} times without finishing (its worker died, or "
                f"its image was lost, each time); gave up after FARM_MAX_ATTEMPTS={max_attempts}",
                lease_expires_at=None,
            )
        else:
            row["lease_expires_at"] = expires
            start.todo.append(
                StagedCandidate(
                    **{
                        **c._mapping,
                        "stage_attempts": counts,
                        "attempts": c.attempts + 1,
                        "lease_expires_at": expires,
                        **lease,
                    }
                )
            )
        writes.append(row)
    # The claim is exactly what was written: run one row at a time (the retry after a race), an update can
    # match no row, because another delivery or the reaper moved that candidate on after it was read here.
    # Kept in ``todo`` (its lease generation ``token``), it would have two live holders of one generation
    # (this one and whoever wrote it), and both would pass every token guard.
    applied = _write_guarded(conn, writes, one_by_one=one_by_one)
    start.held_elsewhere += [c.id for c in start.todo if c.id not in applied]
    start.todo = [c for c in start.todo if c.id in applied]
    return start


@dataclass
class StageWrite:
    """One stage's results on a slice, as ``apply_stages`` writes them.

    ``started`` holds the candidates as the task knows them; ``entering`` is the stage a candidate that
    passed goes on to, counted as started there in the same update (as ``begin_stages`` counts a delivery);
    ``within`` runs in the same transaction once the rows are written, with the ids written (the
    near-duplicate check, whose flags then commit with the hashes they come from), and ``before`` before
    they are (the lock that check needs).
    """

    stage: str
    updates: dict[str, dict[str, Any]]
    timing: dict[str, Any]
    started: dict[str, StagedCandidate]
    entering: str | None = None
    within: Callable[[Connection, list[str]], None] | None = None
    before: Callable[[Connection], None] | None = None
    #: The statuses at which the task goes on working on a candidate: a candidate written to any other
    #: status leaves this task (settled, or handed to another task), and its lease is released in the same
    #: update. None leaves the lease as it is.
    keeps: frozenset[str] | None = None


def apply_stages(
    url: str, writes: list[StageWrite], *, also: Also | None = None
) -> list[list[StagedCandidate]]:
    """Write consecutive stages' results on a slice in one transaction, in order (batched, not one commit
    per row or per stage: each transaction cost a stage about 1 ms on a device worker).

    Each update is guarded by its stage's input status, so a redelivered stage that finishes after another
    delivery already advanced a candidate changes nothing, and by the lease generation the task holds, so a
    holder whose lease was taken over (it was paused past its expiry) writes nothing; a later stage's result
    is written only onto a candidate the earlier write in the same transaction moved to its input. The
    candidates in ``started`` are updated in place once the transaction commits (their timings are extended,
    not reread), and each write's list of those it wrote is returned, so the next stage works on them
    without reading them again.
    ``also`` (the heartbeat) rides in the same transaction.
    """
    if not any(w.updates for w in writes) and also is None:
        return [[] for _ in writes]

    def write(conn: Connection, one_by_one: bool) -> tuple[dict[str, dict[str, Any]], list[list[str]]]:
        now: dict[str, dict[str, Any]] = {}  # what this transaction wrote so far, by candidate
        done = []
        for w in writes:
            if w.before is not None and w.updates:
                w.before(conn)
            rows = [
                _stage_row(w, cid, result, now.get(cid, {}))
                for cid, result in w.updates.items()
                if now.get(cid, {}).get("status", w.started[cid].status) == STAGE_INPUT[w.stage]
            ]
            applied = _write_guarded(conn, rows, one_by_one=one_by_one)
            ids = [row["b_id"] for row in rows if row["b_id"] in applied]
            for row in rows:
                if row["b_id"] in applied:
                    now.setdefault(row["b_id"], {}).update((k, v) for k, v in row.items() if k[:2] != "b_")
            if w.within is not None and ids:
                w.within(conn, ids)
            done.append(ids)
        if also is not None:
            also(conn)
        return now, done

    now, done = _in_transaction(url, write)
    held = {cid: c for w in writes for cid, c in w.started.items()}
    for cid, values in now.items():
        for key, value in values.items():
            setattr(held[cid], key, value)
    return [[held[cid] for cid in ids] for ids in done]


def _stage_row(w: StageWrite, cid: str, result: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """The guarded update of one candidate for ``w``, on top of what this transaction already wrote."""
    c = w.started[cid]
    row = {
        "status": STAGE_OUTPUT[w.stage],
        "stage": w.stage,
        **result,
        "timings": {**(now.get("timings", c.timings) or {}), w.stage: w.timing},
    }
    if w.entering and row["status"] == STAGE_OUTPUT[w.stage]:
        counts = {**(now.get("stage_attempts", c.stage_attempts) or {})}
        counts[w.entering] = counts.get(w.entering, 0) + 1
        row["stage_attempts"] = counts
        row["attempts"] = now.get("attempts", c.attempts) + 1
    if w.keeps is not None and row["status"] not in w.keeps:
        row["lease_expires_at"] = None
    return {**row, "b_id": cid, "b_status": STAGE_INPUT[w.stage], "b_token": c.lease_token}


def renew_lease(
    url: str, candidate_ids: list[str], token: int, *, seconds: float, also: Also | None = None
) -> set[str]:
    """Extend the lease of generation ``token`` on these candidates by ``seconds`` from now; returns those
    still held (the others were taken over by a newer generation, or released). One UPDATE, in a
    transaction with ``also`` (the worker row's heartbeat); ``updated_at`` is left as it is, since a renewal
    is not progress."""
    held = (_C.c.id.in_(candidate_ids), _C.c.lease_token == token, _C.c.lease_expires_at.is_not(None))
    with get_engine(url).begin() as conn:
        renewed = set(
            conn.execute(
                update(_C)
                .where(*held)
                .values(lease_expires_at=utcnow() + timedelta(seconds=seconds), updated_at=_C.c.updated_at)
                .returning(_C.c.id)
            ).scalars()
        )
        if also is not None:
            also(conn)
        return renewed


def release_lease(url: str, candidate_ids: list[str], token: int) -> None:
    """Give the lease of generation ``token`` up on these candidates (a task that stopped on an error: its
    retry, wherever it runs, takes them at once instead of waiting for the lease to run out)."""
    with get_engine(url).begin() as conn:
        conn.execute(
            update(_C)
            .where(_C.c.id.in_(candidate_ids), _C.c.lease_token == token)
            .values(lease_expires_at=None, updated_at=_C.c.updated_at)
        )


def take_expired_leases(url: str, now: datetime, *, seconds: float = 60.0) -> list[Row[Any]]:
    """The reaper's side of the lease: every unsettled candidate whose lease ran out (its holder stopped
    renewing it: killed, paused, cut off) moves to a new generation in one atomic UPDATE. The old holder's
    writes no longer match its token; the candidates, returned (id, item_id, batch_id, index, lease_token),
    are for the reaper to re-send. A renewal that commits first keeps its lease.

    The new generation is held by ``REAPER`` for ``seconds`` (any delivery may take it): the takeover
    commits before the re-send, so if the send fails (the broker restarting) or the reaper dies in between,
    the hold runs out and a later reaper run takes the candidates and sends them again, instead of leaving
    them with neither a lease nor a message. ``sent_leases`` ends the hold once the send went out."""
    with get_engine(url).begin() as conn:
        return list(
            conn.execute(
                update(_C)
                .where(
                    _C.c.lease_expires_at < now,
                    _C.c.status.not_in(CANDIDATE_SETTLED),
                )
                .values(
                    lease_token=_C.c.lease_token + 1,
                    lease_owner=REAPER,
                    lease_expires_at=now + timedelta(seconds=seconds),
                )
                .returning(_C.c.id, _C.c.item_id, _C.c.batch_id, _C.c.index, _C.c.lease_token)
            ).all()
        )


def sent_leases(url: str, taken: list[Row[Any]]) -> None:
    """End the reaper's hold on candidates ``take_expired_leases`` returned, whose re-send went out: held by
    nobody, as new work is (a hold kept until it ran out would re-send a message still queued behind a
    backlog, again every FARM_LEASE_SECONDS). Only a hold still the reaper's, of that generation, is
    ended: a delivery that took the candidates meanwhile keeps its lease."""
    if not taken:
        return
    with get_engine(url).begin() as conn:
        conn.execute(
            update(_C)
            .where(
                _C.c.id == bindparam("b_id"),
                _C.c.lease_token == bindparam("b_token"),
                _C.c.lease_owner == REAPER,
            )
            .values(lease_owner=None, lease_expires_at=None, updated_at=_C.c.updated_at),
            [{"b_id": r.id, "b_token": r.lease_token} for r in taken],
        )


def batch_hashes(
    conn: Connection, batch_id: str, *, since: datetime | None = None
) -> tuple[dict[str, str], datetime | None]:
    """PDQ hashes of the batch's candidates moderated so far (for near-duplicate flags), and the newest
    ``updated_at`` among them; with ``since``, only rows changed from then on (a worker keeps the rest)."""
    query = select(_C.c.id, _C.c.pdq_hash, _C.c.updated_at).where(
        _C.c.batch_id == batch_id, _C.c.pdq_hash.is_not(None)
    )
    if since is not None:
        query = query.where(_C.c.updated_at >= since)
    rows = conn.execute(query).all()
    newest = max((r[2] for r in rows), default=since)
    return {cid: h for cid, h, _ in rows}, newest


def lock_batch_hashes(conn: Connection, batch_id: str) -> None:
    """Serialise the writes of a batch's hashes, with their near-duplicate checks, until this transaction
    ends: of two slices moderated at once the second reads the first's hashes, and the hashes' updated_at
    follows commit order, so a worker's "changed since" read never skips a row committed late. SQLite's one
    write lock (BEGIN IMMEDIATE) already does; PostgreSQL takes a transaction-scoped advisory lock."""
    if conn.dialect.name == "postgresql":
        key = int.from_bytes(hashlib.blake2b(batch_id.encode(), digest_size=8).digest(), "big", signed=True)
        conn.execute(select(func.pg_advisory_xact_lock(key)))


def add_near_duplicate_flags(conn: Connection, twins: dict[str, list[str]], limit: int) -> None:
    """Record near-duplicate pairs as flags (not rejections) on both candidates of each pair, once each."""
    if not twins:
        return
    pairs: dict[str, set[str]] = {}
    for cid, others in twins.items():
        for other in others:
            pairs.setdefault(cid, set()).add(other)
            pairs.setdefault(other, set()).add(cid)
    query = select(_C.c.id, _C.c.moderation, _C.c.reasons).where(_C.c.id.in_(list(pairs))).order_by(_C.c.id)
    for cid, moderation, reasons in conn.execute(query).all():
        layers = [dict(v) for v in moderation or []]
        known = next((v for v in layers if v["layer"] == "near_duplicate"), None)
        of = sorted(set(known["details"]["of"] if known else []) | pairs[cid])
        flag = {
            "layer": "near_duplicate",
            "verdict": "flag",
            "reason": f"near-duplicate of {', '.join(of[:5])}",
            "details": {"of": of, "max_distance": limit},
        }
        kept = [r for r in reasons or [] if not r.startswith("near_duplicate:")]
        conn.execute(
            update(_C)
            .where(_C.c.id == cid)
            .values(
                moderation=[v for v in layers if v["layer"] != "near_duplicate"] + [flag],
                reasons=[*kept, f"near_duplicate: {flag['reason']}"],
            )
        )


def failure(stage: str, error: BaseException | str) -> dict[str, Any]:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"status": CandidateStatus.FAILED, "stage": stage, "error": f"{stage}: {text}"[:4000]}


def cancelled(stage: str) -> dict[str, Any]:
    """A candidate whose stage stopped because its batch was cancelled (generate, mid-slice): final, and it
    names no image, since none was made."""
    return {"status": CandidateStatus.CANCELLED, "stage": stage, "image_path": None}


def batch_stopped(url: str, batch_id: str) -> bool:
    """Whether the batch was cancelled (cancelling or cancelled): what a generating slice polls between its
    denoising steps (farm.tasks.interrupt, at most four times a second)."""
    with _reading(url) as conn:
        return conn.execute(select(_B.c.status).where(_B.c.id == batch_id)).scalar() in BATCH_STOPPED


def image_failure(stage: str, error: str) -> dict[str, Any]:
    """A failure whose image is not in the store: the row names no image, so rows and files agree."""
    return {**failure(stage, error), "image_path": None}


def image_lost(c: StagedCandidate) -> dict[str, Any]:
    """A generated candidate whose image is nowhere goes back to generate's input, its row cleared of the
    image: its seed is fixed in SQL, so generating it again makes the same image. The later stages' attempt
    counts start over with the new image; generate's stays, and each delivery that generates it again counts
    against FARM_MAX_ATTEMPTS, so images lost again and again end in a failure."""
    return {
        "status": STAGE_INPUT["generate"],
        "stage": None,
        "image_path": None,
        "recipe": {},
        "device": None,
        "worker": None,
        "stage_attempts": {k: v for k, v in (c.stage_attempts or {}).items() if k == "generate"},
    }


def image_names(url: str, batch_id: str) -> set[str]:
    """The store names of the images the batch's rows name."""
    with _reading(url) as conn:
        named = select(_C.c.image_path).where(_C.c.batch_id == batch_id, _C.c.image_path.is_not(None))
        return set(conn.scalars(named))


def forget_missing_images(url: str, images: list[tuple[str, str]], present: set[str]) -> list[str]:
    """Closed candidates whose row names an image that is not in the store (``present``: those of the names
    in ``images`` the store holds) name none, so rows and files agree; returns their ids. One executemany,
    each row guarded by its name and a closed status."""
    gone = [(cid, path) for cid, path in images if path not in present]
    if gone:
        with get_engine(url).begin() as conn:
            conn.execute(
                update(_C)
                .where(
                    _C.c.id == bindparam("b_id"),
                    _C.c.image_path == bindparam("b_path"),
                    _C.c.status.in_(CANDIDATE_ABANDONED),
                )
                .values(image_path=None),
                [{"b_id": cid, "b_path": path} for cid, path in gone],
            )
    return [cid for cid, _ in gone]


def statuses(url: str, candidate_ids: list[str]) -> dict[str, str]:
    """The status of each candidate that still exists."""
    with _reading(url) as conn:
        return dict(conn.execute(select(_C.c.id, _C.c.status).where(_C.c.id.in_(candidate_ids))).all())
