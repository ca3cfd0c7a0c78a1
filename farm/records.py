"""SQL operations on batches, items and candidates that the stages, the CLI and the web share.

Every write here is idempotent: stage results are applied only to candidates still at the status the stage
expects, item completion is guarded by the item's own status, and the batch counter moves only when an item
changes to done, so redelivered tasks never double-count.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from functools import cached_property
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Row, bindparam, case, func, select, update
from sqlalchemy.orm import Session

from farm.db import READ_ONLY, Batch, Candidate, Item, ItemRound, get_engine, utcnow
from farm.states import (
    BATCH_STOPPED,
    CANDIDATE_ABANDONED,
    CANDIDATE_FINAL,
    CANDIDATE_SETTLED,
    ITEM_CLOSED,
    STAGE_INPUT,
    STAGE_OUTPUT,
    BatchStatus,
    CandidateStatus,
    ItemStatus,
    RoundKind,
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


_C, _I, _B, _R = Candidate.__table__, Item.__table__, Batch.__table__, ItemRound.__table__
#: What a stage reads of its batch: all but the manifest's text, which can be large.
_BATCH_COLUMNS = [c for c in _B.c if c.name != "manifest_yaml"]
#: Update candidate ``b_id`` only while it still has status ``b_status`` (what makes redeliveries harmless)
#: and lease generation ``b_token`` (what makes a holder whose lease was taken over harmless: fencing).
_GUARDED = update(_C).where(
    _C.c.id == bindparam("b_id"),
    _C.c.status == bindparam("b_status"),
    _C.c.lease_token == bindparam("b_token"),
)


def _reading(url: str) -> Connection:
    """A read-only connection (no ORM session: these reads run for every slice): on SQLite it begins deferred,
    so it neither waits for a writer nor holds one up."""
    return get_engine(url).execution_options(**{READ_ONLY: True}).connect()


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


class Raced(Enum):
    """What :func:`add_topup_round` and :func:`finish_item` return, having written nothing, when the item
    changed since the caller's :class:`RankView` (another rank of it added a round or closed it). Two ranks
    of one item are normal in recovery (each lease re-send makes a chord of its own); the one holding the
    stale view must neither add a second round nor close the item over the newer round's candidates: the
    rank that changed the item, or its round's own rank, carries on."""

    RACED = "raced"


RACED = Raced.RACED


def _lock_batch_then_read_item(
    conn: Connection, item_id: str, batch_columns: list[Any], item_columns: list[Any]
) -> tuple[Row[Any], Row[Any]]:
    """Lock the item's batch row, then read the item: ``(batch columns, item columns)``.

    Everything that closes an item or adds a round to it takes the batch row first (FOR UPDATE on
    PostgreSQL; SQLite's write lock serialises them anyway), so such transactions of one item run one after
    the other and never lock item and batch in opposite orders (a deadlock). The item is read in a second
    statement, after the lock: on PostgreSQL the locking statement's snapshot predates its wait, and only the
    locked row is re-read when the wait ends, so item columns read with it could predate the other's commit.
    """
    batch = conn.execute(
        select(*batch_columns)
        .join(_I, _I.c.batch_id == _B.c.id)
        .where(_I.c.id == item_id)
        .with_for_update(of=_B)
    ).one()
    item = conn.execute(select(*item_columns).where(_I.c.id == item_id)).one()
    return batch, item


def _write_round(
    conn: Connection,
    item_id: str,
    kind: RoundKind,
    ranking: Sequence[str],
    winners: Sequence[str],
    scores: Mapping[str, float],
) -> None:
    """Record a ranking of the item as its next round, in the transaction of the decision it records (which
    holds the batch lock, so rounds of one item are numbered one at a time; the key backs that up)."""
    number = conn.execute(
        select(func.coalesce(func.max(_R.c.number) + 1, 0)).where(_R.c.item_id == item_id)
    ).scalar_one()
    conn.execute(
        _R.insert().values(
            item_id=item_id,
            number=number,
            kind=kind,
            winners=list(winners),
            ranking={cid: {"rank": n, "score": scores.get(cid)} for n, cid in enumerate(ranking, start=1)},
            considered=len(ranking),
            created_at=utcnow(),
        )
    )


@dataclass(frozen=True)
class Ranked:
    item_id: str
    winners: list[str]
    ranked: list[str]
    batch_closed: bool
    #: ``(candidate id, image path)`` of candidates closed cancelled or failed whose row names an image: an
    #: image handed to a QC task that never stored it (the batch was cancelled, the slice given up) is not in
    #: the store, and :func:`forget_missing_images` clears those rows.
    closed_with_images: list[tuple[str, str]] = field(default_factory=list)
    batch_id: str = ""


def finish_item(
    url: str,
    item_id: str,
    *,
    ranking: list[str],
    winners: list[str],
    scores: dict[str, float],
    rounds: int,
    during: Callable[[], None] | None = None,
) -> Ranked | Raced:
    """Write ranks and winners, mark the item done, and close the batch if this was its last item.

    The item flips to done only once (guarded update), and only that flip moves the batch counter, all in one
    transaction: a rank delivered twice cannot close a batch early or count an item twice. ``rounds`` is the
    item's round count in the caller's view: if another rank added a round (or closed the item) since, this
    writes nothing and returns ``RACED``, so a stale rank never fails the newer round's candidates as
    "ranked before this candidate finished" nor closes the item under them. The close is recorded as the
    item's latest round (``RoundKind.RANKED``), in the same transaction and only with the flip.
    """
    position = {cid: n for n, cid in enumerate(ranking, start=1)}
    # SQL Core, not the ORM: the transaction holds SQLite's write lock, which the next slice's first write
    # waits for, so it does only what must be read and written under it.
    with get_engine(url).begin() as conn:
        # The batch row is locked before its status is read (FOR UPDATE on PostgreSQL; SQLite's write lock
        # already serialises this with a cancel): a cancel committed between the read and the close below
        # would otherwise be overwritten with 'done'. A cancel now waits, then finds the batch closed.
        (batch_id, batch_status), item = _lock_batch_then_read_item(
            conn, item_id, [_B.c.id, _B.c.status], [_I.c.rounds, _I.c.status]
        )
        if item.rounds != rounds or item.status in ITEM_CLOSED:
            return RACED
        stopped = batch_status in BATCH_STOPPED
        rows, closed_with_images = [], []
        for c in conn.execute(
            select(_C.c.id, _C.c.status, _C.c.error, _C.c.score, _C.c.image_path)
            .where(_C.c.item_id == item_id)
        ):
            passed = c.status == CandidateStatus.SCORED
            status, error = (CandidateStatus.PASSED if passed else c.status), c.error
            if status not in CANDIDATE_FINAL:
                status = CandidateStatus.CANCELLED if stopped else CandidateStatus.FAILED
                error = error or "the item was ranked before this candidate finished"
            if status in CANDIDATE_ABANDONED and c.image_path:
                closed_with_images.append((c.id, c.image_path))
            rows.append(
                {
                    "b_id": c.id,
                    "status": status,
                    "error": error,
                    "rank": position.get(c.id),
                    "score": scores.get(c.id, c.score),
                    "is_winner": c.id in winners,
                }
            )
        if rows:
            conn.execute(update(_C).where(_C.c.id == bindparam("b_id")), rows)
        if during is not None:
            during()
        flipped = conn.execute(
            update(_I)
            .where(_I.c.id == item_id, _I.c.status.not_in(ITEM_CLOSED), _I.c.rounds == rounds)
            .values(
                status=ItemStatus.CANCELLED if stopped else ItemStatus.DONE,
                winners=winners,
                finished_at=utcnow(),
            )
        ).rowcount
        closed = False
        if flipped:
            _write_round(conn, item_id, RoundKind.RANKED, ranking, winners, scores)
            conn.execute(update(_B).where(_B.c.id == batch_id).values(items_done=_B.c.items_done + 1))
            batch = conn.execute(select(_B.c.items_done, _B.c.items_total).where(_B.c.id == batch_id)).one()
            if batch.items_done >= batch.items_total:
                conn.execute(
                    update(_B)
                    .where(_B.c.id == batch_id)
                    .values(
                        status=BatchStatus.CANCELLED if stopped else BatchStatus.DONE, finished_at=utcnow()
                    )
                )
                closed = True
        return Ranked(item_id, winners, ranking, closed, closed_with_images, batch_id)


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


@dataclass(frozen=True)
class TopUp:
    batch_id: str
    round: int
    candidate_ids: list[str]
    priority: int


def add_topup_round(
    url: str,
    item_id: str,
    *,
    passed: int,
    rounds: int,
    ranking: Sequence[str] = (),
    winners: Sequence[str] = (),
    scores: Mapping[str, float] | None = None,
) -> TopUp | Raced | None:
    """Add a round of new candidates (new seeds) to an item whose passing candidates fell short, and record
    the caller's ranking of the item so far (``ranking``, ``winners``, ``scores`` as for :func:`finish_item`)
    as a ``RoundKind.TOP_UP`` round in the same transaction: the item's close ranks more candidates later,
    and this ranking would be lost.

    Adds ``2 x shortfall`` candidates (at most the item's first-round count), once per decision: ``rounds`` is
    the item's round count in the caller's view, and if another rank added a round (or closed the item) since,
    this adds none and returns ``RACED`` (reading the fresh count instead would add a second round for one
    shortfall, and the newer round is still to be ranked). None when no round is due. Locks the batch row
    before writing the item, in the order :func:`finish_item` does, so the two never deadlock on PostgreSQL.
    """
    from farm.dispatch import candidate_row
    from farm.manifest import MAX_CANDIDATES_PER_ITEM, candidate_seeds, stored_manifest

    with get_engine(url).begin() as conn:
        batch, item = _lock_batch_then_read_item(
            conn,
            item_id,
            [_B.c.id, _B.c.status, _B.c.settings, _B.c.priority],
            [_I.c.rounds, _I.c.status, _I.c.params, _I.c.index],
        )
        if item.rounds != rounds or item.status in ITEM_CLOSED:
            return RACED
        config = stored_manifest(batch.settings)
        selection = config.selection
        shortfall = selection.min_accepted - passed
        if batch.status in BATCH_STOPPED or shortfall <= 0 or rounds >= selection.max_topup_rounds:
            return None
        existing = conn.execute(
            select(_C.c.round, _C.c.seed).where(_C.c.item_id == item_id).order_by(_C.c.index)
        ).all()
        first_round = sum(1 for c in existing if c.round == 0)
        count = max(1, min(2 * shortfall, first_round, MAX_CANDIDATES_PER_ITEM))
        round_ = rounds + 1
        moved = conn.execute(
            update(_I)
            .where(_I.c.id == item_id, _I.c.rounds == rounds, _I.c.status.not_in(ITEM_CLOSED))
            .values(rounds=round_, candidates_total=_I.c.candidates_total + count)
        ).rowcount
        if not moved:  # cannot happen while the batch lock is held; kept so a stale view never adds a round
            return RACED
        _write_round(conn, item_id, RoundKind.TOP_UP, ranking, winners, scores or {})
        seeds = candidate_seeds(
            config.defaults.seed,
            item.params.get("seed"),
            item.index,
            len(existing),
            count,
            [c.seed for c in existing],
        )
        rows = [
            candidate_row(batch.id, item_id, len(existing) + k, seed, round_=round_)
            for k, seed in enumerate(seeds)
        ]
        conn.execute(_C.insert(), rows)
        conn.execute(
            update(_B).where(_B.c.id == batch.id).values(candidates_total=_B.c.candidates_total + count)
        )
        return TopUp(batch.id, round_, [r["id"] for r in rows], batch.priority)


@dataclass(frozen=True)
class RankView:
    """What ranking an item reads, in one read transaction: whether the item is already closed, how many of
    its candidates are still in flight, the batch's status and settings (``config``, the typed manifest, read
    once per rank), and the scored candidates (id, index, preference, alignment, hash)."""

    closed: bool
    waiting: int
    batch_status: str
    config: Manifest
    prompt: str
    rounds: int
    scored: list[Row[Any]]

    def topup_due(self) -> bool:
        """Whether fewer passed than ``min_accepted`` and a top-up round is still allowed (decided again under
        the write lock by ``add_topup_round``; this only spares the lock when none is due)."""
        selection = self.config.selection
        return (
            self.batch_status not in BATCH_STOPPED
            and len(self.scored) < selection.min_accepted
            and self.rounds < selection.max_topup_rounds
        )


def rank_view(url: str, item_id: str) -> RankView:
    """The item as ``farm.rank`` needs it; ``waiting`` counts candidates not yet final nor scored."""
    from farm.manifest import stored_manifest

    with _reading(url) as conn:
        item = conn.execute(
            select(_I.c.batch_id, _I.c.prompt, _I.c.rounds, _I.c.status).where(_I.c.id == item_id)
        ).one()
        batch = conn.execute(select(_B.c.status, _B.c.settings).where(_B.c.id == item.batch_id)).one()
        rows = conn.execute(
            select(_C.c.id, _C.c.index, _C.c.status, _C.c.preference, _C.c.alignment, _C.c.pdq_hash)
            .where(_C.c.item_id == item_id)
            .order_by(_C.c.index)
        ).all()
    waiting = sum(1 for r in rows if r.status not in CANDIDATE_SETTLED)
    return RankView(
        closed=item.status in ITEM_CLOSED,
        waiting=waiting,
        batch_status=batch.status,
        config=stored_manifest(batch.settings),
        prompt=item.prompt,
        rounds=item.rounds,
        scored=[r for r in rows if r.status == CandidateStatus.SCORED],
    )


def statuses(url: str, candidate_ids: list[str]) -> dict[str, str]:
    """The status of each candidate that still exists."""
    with _reading(url) as conn:
        return dict(conn.execute(select(_C.c.id, _C.c.status).where(_C.c.id.in_(candidate_ids))).all())


def progress(s: Session, batch_id: str) -> dict[str, int]:
    """Candidates of a batch counted by status, plus ``done`` (final) and ``total``."""
    rows = s.execute(
        select(Candidate.status, func.count())
        .where(Candidate.batch_id == batch_id)
        .group_by(Candidate.status)
    ).all()
    counts = Counter({status: n for status, n in rows})
    out = dict(counts)
    out["done"] = sum(counts[s_] for s_ in CANDIDATE_FINAL)
    out["total"] = sum(counts.values())
    return out


def candidate_dict(c: Candidate) -> dict[str, Any]:
    return {
        "id": c.id,
        "index": c.index,
        "round": c.round,
        "seed": c.seed,
        "device": c.device,
        "worker": c.worker,
        "status": c.status,
        "stage": c.stage,
        "attempts": c.attempts,
        "image_path": c.image_path,
        "pdq_hash": c.pdq_hash,
        "verdict": c.verdict,
        "reasons": c.reasons,
        "moderation": c.moderation,
        "alignment": c.alignment,
        "attributes": c.attributes,
        "preference": c.preference,
        "score": c.score,
        "rank": c.rank,
        "is_winner": c.is_winner,
        "timings": c.timings,
        "error": c.error,
    }


def item_rounds(s: Session, batch_id: str) -> dict[str, list[ItemRound]]:
    """The ranking rounds of the batch's items, by item id, each item's in order (the latest last)."""
    found: dict[str, list[ItemRound]] = {}
    for r in s.scalars(
        select(ItemRound)
        .join(Item, Item.id == ItemRound.item_id)
        .where(Item.batch_id == batch_id)
        .order_by(ItemRound.item_id, ItemRound.number)
    ):
        found.setdefault(r.item_id, []).append(r)
    return found


def round_dict(r: ItemRound) -> dict[str, Any]:
    """A round as the JSON views show it. Its per-candidate ranking stays in SQL: the closing round's is
    already in each candidate's ``rank`` and ``score``."""
    return {"number": r.number, "kind": r.kind, "winners": r.winners, "created_at": _iso(r.created_at)}


def batch_dict(s: Session, batch: Batch, *, with_items: bool = True) -> dict[str, Any]:
    """The batch as JSON: what `farm status --json` prints and the API returns."""
    out: dict[str, Any] = {
        "id": batch.id,
        "name": batch.name,
        "status": batch.status,
        "model": batch.model,
        "priority": batch.priority,
        "tags": batch.tags,
        "items_total": batch.items_total,
        "items_done": batch.items_done,
        "candidates_total": batch.candidates_total,
        "progress": progress(s, batch.id),
        "error": batch.error,
        "created_at": _iso(batch.created_at),
        "started_at": _iso(batch.started_at),
        "finished_at": _iso(batch.finished_at),
    }
    if with_items:
        items = s.scalars(select(Item).where(Item.batch_id == batch.id).order_by(Item.index)).all()
        cands = s.scalars(
            select(Candidate)
            .where(Candidate.batch_id == batch.id)
            .order_by(Candidate.item_id, Candidate.index)
        ).all()
        by_item: dict[str, list[dict[str, Any]]] = {}
        for c in cands:
            by_item.setdefault(c.item_id, []).append(candidate_dict(c))
        rounds = item_rounds(s, batch.id)
        out["items"] = [
            {
                "id": it.id,
                "index": it.index,
                "prompt": it.prompt,
                "source": it.source,
                "status": it.status,
                "params": it.params,
                "winners": it.winners,
                "rounds": [round_dict(r) for r in rounds.get(it.id, [])],
                "candidates": by_item.get(it.id, []),
            }
            for it in items
        ]
    return out


def _iso(dt: Any) -> str | None:
    return dt.isoformat() + "Z" if dt else None
