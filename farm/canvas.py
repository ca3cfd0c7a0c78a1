"""The farm's task names and the signatures that send them: one place, so a name and its options (queue,
priority, immutability) cannot drift apart between the modules that send the same task.

The names are what deployed workers register and queued messages carry: they never change. Each builder
takes the Celery app it sends with (a process may drive a second farm, farm.celery_app.app_for), and returns
a signature that the caller sends, links or puts in a chord; retry policies stay with the call that sends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from farm.broker import CONTROL_QUEUE

if TYPE_CHECKING:
    from celery import Celery
    from celery.canvas import Signature

#: A slice of an item's candidates: generate, then moderate, validate and score on the device that took it.
SLICE_TASK = "farm.slice"
#: FARM_QC=worker: a generated slice's checks, on its device's QC worker.
QC_TASK = "farm.qc"
#: An item ranked after its slices (a chord's body, or the link after a one-slice item's task).
RANK_TASK = "farm.rank"
#: A written batch's chords sent, item by item.
DISPATCH_BATCH_TASK = "farm.dispatch_batch"
#: Lost work found and finished (farm.reaper), on beat and when the control worker starts.
REAP_TASK = "farm.reap"

#: Every task the farm registers.
TASK_NAMES = (SLICE_TASK, QC_TASK, RANK_TASK, DISPATCH_BATCH_TASK, REAP_TASK)
#: The tasks the control worker runs (routed to the control queue whoever sends them).
CONTROL_TASKS = (RANK_TASK, DISPATCH_BATCH_TASK, REAP_TASK)


def slice_signature(app: Celery, payload: dict[str, Any], *, queue: str, priority: int | None) -> Signature:
    """One slice (``{"batch_id", "item_id", "candidates"}``) sent to ``queue``: ``slices``, a model queue or
    a device's. ``priority`` None is what a task replacing itself passes when its delivery had none."""
    return app.signature(SLICE_TASK, args=(payload,), queue=queue, priority=priority)


def qc_signature(app: Celery, payload: dict[str, Any], *, queue: str, priority: int | None) -> Signature:
    """A generated slice's checks on the QC worker's queue (farm.broker.qc_queue)."""
    return app.signature(QC_TASK, args=(payload,), queue=queue, priority=priority)


def rank_signature(
    app: Celery, item_id: str, *, priority: int | None = None, immutable: bool = False
) -> Signature:
    """The item's rank on the control queue. ``immutable`` when it follows slices (a chord's body, a chain's
    link), so their results are not passed to it; without ``priority`` it goes at the broker's default."""
    options: dict[str, Any] = {"queue": CONTROL_QUEUE}
    if priority is not None:
        options["priority"] = priority
    if immutable:
        options["immutable"] = True
    return app.signature(RANK_TASK, args=(item_id,), **options)


def dispatch_signature(app: Celery, batch_id: str, *, ignore_result: bool = False) -> Signature:
    """The batch's dispatch on the control queue. Submit and resume send it with ``ignore_result`` and the
    reaper's re-send without, as each always has (the task ignores its result either way)."""
    options: dict[str, Any] = {"queue": CONTROL_QUEUE}
    if ignore_result:
        options["ignore_result"] = True
    return app.signature(DISPATCH_BATCH_TASK, args=(batch_id,), **options)


def reap_signature(app: Celery) -> Signature:
    """A reap on the control queue (beat sends its own from farm.celery_app's schedule)."""
    return app.signature(REAP_TASK, queue=CONTROL_QUEUE)
