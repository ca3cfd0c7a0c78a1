"""The one home of batch, item and candidate statuses: their values, the sets the code acts on, and the
transitions allowed between them; and of the kinds of an item's ranking rounds.

Why one module: the same words were spelled out across dispatch, records, the reaper, the CLI and the web, and
the copies drifted (two different sets were both called "active"; a batch status "failed" was waited for but
never written). StrEnums compare equal to, hash like and serialise as the plain strings SQL already stores,
so rows written before this module need no migration, and a status read back from SQL (a plain ``str``)
compares equal to the member. Migrations keep their frozen literals. tests/test_states.py checks that no
other module under farm/ and web/ spells a status out, and that every transition the code performs is in
``TRANSITIONS``.
"""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    """queued -> running -> done; a cancel makes it cancelling until its last item closes, then cancelled.
    A retry of a done batch's failed candidates opens it again (done -> running)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class ItemStatus(StrEnum):
    """pending until dispatch sends its chord, running until its rank closes it done (or cancelled)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class CandidateStatus(StrEnum):
    """pending -> generated -> moderated -> validated -> scored, one status per stage finished, then passed
    once its item is ranked; rejected, failed or cancelled end it on the way."""

    PENDING = "pending"
    GENERATED = "generated"
    MODERATED = "moderated"
    VALIDATED = "validated"
    SCORED = "scored"
    PASSED = "passed"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"


class CandidateVerdict(StrEnum):
    """The ``verdict`` column: what moderation (or a check that rejects, in generate and validate) decided.
    Not a status, though spelled like two: a candidate moderation passed goes on to validation, not to
    ``passed``."""

    PASSED = "passed"
    REJECTED = "rejected"


class RoundKind(StrEnum):
    """What wrote one of an item's ranking rounds (the ``item_rounds`` table; the latest round's winners are
    the item's). Only the kinds written now are defined; the coming ones (a ``farm rescore`` of stored images
    with new checks, a reviewer's pick overriding the winners, a released candidate) become members here when
    the code that writes them lands: the column is a plain string, so adding a kind needs no migration."""

    #: A rank that found fewer passing than ``min_accepted`` and added a top-up round of candidates; its
    #: winners are those the item would have had, had it closed then.
    TOP_UP = "top_up"
    #: The rank that closed the item (done, or cancelled when its batch was).
    RANKED = "ranked"
    #: A `farm retry` that reopened the item to generate its failed candidates again: no winners until the
    #: item is ranked again, as the item's own ``winners`` say meanwhile.
    REOPENED = "reopened"


#: Batch statuses open to new work: dispatch sends their unsent items, and cancel and resume act on them.
BATCH_OPEN = (BatchStatus.QUEUED, BatchStatus.RUNNING)
#: Batch statuses not closed yet, cancelling included: their slices may still wait in a queue or run, so
#: placement counts the batches that consume a model queue among these. Not ``BATCH_OPEN``: a cancelling
#: batch takes no new work, but what it already sent still drains.
BATCH_LIVE = (BatchStatus.QUEUED, BatchStatus.RUNNING, BatchStatus.CANCELLING)
#: Batch statuses after a cancel: start nothing new for the batch.
BATCH_STOPPED = (BatchStatus.CANCELLING, BatchStatus.CANCELLED)
#: Batch statuses at which it is closed: every item closed; what waits for a batch waits for these.
BATCH_CLOSED = (BatchStatus.DONE, BatchStatus.CANCELLED)

#: Item statuses at which its rank has closed it: nothing ranks it or adds a round to it again.
ITEM_CLOSED = (ItemStatus.DONE, ItemStatus.CANCELLED)

#: Candidate statuses no stage and no rank changes any more (only an operator's retry of failed ones).
CANDIDATE_FINAL = (
    CandidateStatus.PASSED,
    CandidateStatus.REJECTED,
    CandidateStatus.FAILED,
    CandidateStatus.CANCELLED,
)
#: Statuses at which no stage works on a candidate any more: final, or scored and waiting for its item's rank.
CANDIDATE_SETTLED = (*CANDIDATE_FINAL, CandidateStatus.SCORED)
#: Statuses not final yet, in pipeline order: the web's "in progress" filter.
CANDIDATE_IN_PROGRESS = tuple(s for s in CandidateStatus if s not in CANDIDATE_FINAL)
#: Between stages: generated and not yet scored, so a later stage of the slice that generated it (on the
#: same device) still has work on it.
CANDIDATE_IN_FLIGHT = (CandidateStatus.GENERATED, CandidateStatus.MODERATED, CandidateStatus.VALIDATED)
#: Final without a verdict on an image: its image may never have reached the store.
CANDIDATE_ABANDONED = (CandidateStatus.FAILED, CandidateStatus.CANCELLED)

#: The status a candidate must have for each stage to work on it.
STAGE_INPUT = {
    "generate": CandidateStatus.PENDING,
    "moderate": CandidateStatus.GENERATED,
    "validate": CandidateStatus.MODERATED,
    "score": CandidateStatus.VALIDATED,
}
#: The status each stage moves a candidate it passes to.
STAGE_OUTPUT = {
    "generate": CandidateStatus.GENERATED,
    "moderate": CandidateStatus.MODERATED,
    "validate": CandidateStatus.VALIDATED,
    "score": CandidateStatus.SCORED,
}

_B, _I, _C = BatchStatus, ItemStatus, CandidateStatus
#: The status each kind of row starts at.
INITIAL: dict[type[StrEnum], StrEnum] = {_B: _B.QUEUED, _I: _I.PENDING, _C: _C.PENDING}
#: Every status change the code may make, per kind of row, as ``old -> allowed new statuses``; a status
#: missing as a key has no way out. Keyed by kind first: equal strings ("done", "cancelled") of two kinds
#: are one dict key. Written as data so a test can hold the code to it.
TRANSITIONS: dict[type[StrEnum], dict[StrEnum, frozenset[StrEnum]]] = {
    # started (its first slice), cancelled; closed by its last item's rank; reopened by a retry.
    _B: {
        _B.QUEUED: frozenset({_B.RUNNING, _B.CANCELLING}),
        _B.RUNNING: frozenset({_B.DONE, _B.CANCELLING}),
        _B.CANCELLING: frozenset({_B.CANCELLED}),
        _B.DONE: frozenset({_B.RUNNING}),
    },
    # sent by dispatch, or closed by the rank a cancel sends for it; ranked; reopened by a retry.
    _I: {
        _I.PENDING: frozenset({_I.RUNNING, _I.CANCELLED}),
        _I.RUNNING: frozenset({_I.DONE, _I.CANCELLED}),
        _I.DONE: frozenset({_I.RUNNING}),
    },
    # each stage moves on, rejects, fails or finds the batch cancelled; moderate sends a candidate whose
    # image is lost back to generate; a rank passes the scored and closes the rest; a retry resets failed
    # candidates and puts their items' passed ones back to scored.
    _C: {
        _C.PENDING: frozenset({_C.GENERATED, _C.REJECTED, _C.FAILED, _C.CANCELLED}),
        _C.GENERATED: frozenset({_C.MODERATED, _C.REJECTED, _C.FAILED, _C.CANCELLED, _C.PENDING}),
        _C.MODERATED: frozenset({_C.VALIDATED, _C.REJECTED, _C.FAILED, _C.CANCELLED}),
        _C.VALIDATED: frozenset({_C.SCORED, _C.FAILED, _C.CANCELLED}),
        _C.SCORED: frozenset({_C.PASSED, _C.CANCELLED}),
        _C.PASSED: frozenset({_C.SCORED}),
        _C.FAILED: frozenset({_C.PENDING}),
    },
}


def allowed(kind: type[StrEnum], old: str, new: str) -> bool:
    """Whether a ``kind`` row (BatchStatus, ItemStatus or CandidateStatus) may go from ``old`` to ``new``;
    staying at the same status is always allowed (guarded writes often rewrite it)."""
    old_s, new_s = kind(old), kind(new)
    return old_s == new_s or new_s in TRANSITIONS[kind].get(old_s, frozenset())
