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

#: A slice of an item's candidates is a chain of four stage tasks: generate on whichever device takes it,
#: then moderate, validate and score on the host that holds its images (farm.tasks.chain).
GENERATE_TASK = "farm.generate"
MODERATE_TASK = "farm.moderate"
VALIDATE_TASK = "farm.validate"
SCORE_TASK = "farm.score"
#: The stage tasks in chain order, and those after generate (sent on to the generating host).
STAGE_TASKS = (GENERATE_TASK, MODERATE_TASK, VALIDATE_TASK, SCORE_TASK)
CHECK_TASKS = STAGE_TASKS[1:]
#: An item ranked after its slices (a chord's body, or the link after a one-slice item's task).
RANK_TASK = "farm.rank"
#: A written batch's chords sent, item by item.
DISPATCH_BATCH_TASK = "farm.dispatch_batch"
#: Lost work found and finished (farm.reaper), on beat and when the control worker starts.
REAP_TASK = "farm.reap"

#: Every task the farm registers.
TASK_NAMES = (*STAGE_TASKS, RANK_TASK, DISPATCH_BATCH_TASK, REAP_TASK)
#: The tasks the control worker runs (routed to the control queue whoever sends them).
CONTROL_TASKS = (RANK_TASK, DISPATCH_BATCH_TASK, REAP_TASK)


def slice_chain(
    app: Celery,
    payload: dict[str, Any],
    *,
    queue: str,
    priority: int | None,
    stages: tuple[str, ...] = STAGE_TASKS,
) -> Signature:
    """One slice (``{"batch_id", "item_id", "candidates"}``) as the chain of its ``stages`` (all four unless
    a task sends part of one), each immutable with the payload: a stage reads its candidates from SQL, not
    from the task before it. The first goes to ``queue`` (``slices``, a model queue or a device's) at
    ``priority``; the later ones name the same queue until generate sends them to its host
    (``send_checks_to``). ``priority`` None is what a task replacing itself passes when its delivery had
    none."""
    from celery import chain

    first, *rest = stages
    return chain(
        app.signature(first, args=(payload,), queue=queue, priority=priority, immutable=True),
        *(app.signature(name, args=(payload,), queue=queue, immutable=True) for name in rest),
    )


def send_checks_to(request_chain: list[dict[str, Any]] | None, queue: str | None) -> None:
    """Route the rest of a slice's chain (the stage tasks a running task's ``request.chain`` still holds,
    not the rank after them) to ``queue``: the generating worker's own queue or its QC worker's.

    Celery sends the chain's next task from ``request.chain`` once this task returns, before its message is
    acked, so the change goes out with it and a redelivered task carries it on (celery/app/trace.py). The
    next task goes without a priority (Celery passes the parent's only with task_inherit_parent_priority),
    which kombu's Redis transport serves first, at step 0: a worker finishes the slice it holds before it
    takes new work at the same step from the queues it lists after its own. ``queue`` None (a process
    serving no device) leaves the chain as it was sent."""
    if queue is None:
        return
    for sig in request_chain or ():
        if sig.get("task") in CHECK_TASKS:
            sig.setdefault("options", {})["queue"] = queue


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
