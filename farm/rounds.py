"""Ranking an item, in SQL: what a rank reads (``rank_view``), the top-up round it may add
(``add_topup_round``) and the close that records the winners (``finish_item``), each decision written as
the item's next round (``item_rounds``) in its own transaction.

Every write here is idempotent: an item is closed or topped up only while it still has the status and round
count the rank read, under its batch row's lock, and the batch counter moves only when an item changes to
done, so redelivered or raced ranks never double-count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Row, bindparam, func, select, update

from farm.db import get_engine, utcnow
from farm.sql import BATCHES as _B
from farm.sql import CANDIDATES as _C
from farm.sql import ITEMS as _I
from farm.sql import ROUNDS as _R
from farm.sql import reading as _reading
from farm.states import (
    BATCH_STOPPED,
    CANDIDATE_ABANDONED,
    CANDIDATE_FINAL,
    CANDIDATE_SETTLED,
    ITEM_CLOSED,
    BatchStatus,
    CandidateStatus,
    ItemStatus,
    RoundKind,
)

if TYPE_CHECKING:
    from farm.manifest import Manifest


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


def reopen_round(conn: Connection, item_id: str) -> None:
    """Record that a retry reopened the item (``RoundKind.REOPENED``): no winners until it is ranked again,
    so the latest round says what the item's ``winners`` say meanwhile. Written in the retry's transaction,
    which holds the batch's row (its guarded flip back to running)."""
    _write_round(conn, item_id, RoundKind.REOPENED, (), (), {})


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
    #: the store, and :func:`farm.records.forget_missing_images` clears those rows.
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
    config: Manifest | None = None,
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
    ``config``: the batch's typed settings where the caller read them already (farm.rank's view), so they
    are parsed once per task; a batch's settings never change after submit.
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
        config = config or stored_manifest(batch.settings)
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
