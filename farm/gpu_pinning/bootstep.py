"""`celery -A farm.celery_app worker --device cuda0`: the plain Celery command as the farm's device worker.

Celery users start workers with `celery worker -Q cuda0`. Without help that worker saw every GPU, forked a
child per core, called itself ``celery@host`` and generated unpinned on the CPU of a GPU host. The app now
registers a ``--device`` worker option (``app.user_options['worker']``) and the ``DeviceWorker`` bootstep,
which makes the worker what `farm worker --device cuda0` starts: pinned (CUDA_VISIBLE_DEVICES and the thread
variables), named ``cuda0@host``, one prefork child, consuming its own queue (named as it is), its device
queue, the shared ``slices`` queue and its preloaded generator's model queue, without gossip and mingle.
The rest of a device worker's life (its QC worker under FARM_QC=worker, the SIGTERM drain, the model queues
it follows) comes from the bootsteps in farm.lifecycle, which go by the pinning this step sets. `-Q cuda0`
alone names the device as well. A worker that would take slices without a device (``-Q slices``, two device
queues, a QC queue) refuses to start and says what to run instead.

Why a bootstep is in time (read from Celery 5.7, celery/worker/worker.py and celery/bootsteps.py):
``WorkController.__init__`` resolves -Q and the concurrency, then ``Blueprint.apply`` constructs every step
(their ``__init__``) before any step creates anything: the pool (which forks with ``w.min_concurrency``
children and ``w.hostname``), the consumer (which reads the queues and the name). Torch is not imported by
then: the task modules import farm.ml lazily, in the pool child; ``apply_pinning`` checks it. The step may
be built before or after the Pool step (the two do not depend on each other), so it sets both
``concurrency`` and ``min_concurrency``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import click
from celery import bootsteps
from celery.bin.base import CeleryOption

from farm.broker import CONTROL_QUEUE, QC_PREFIX, SLICES_QUEUE, local_queue
from farm.config import Settings

log = logging.getLogger(__name__)

DEVICE_OPTION = CeleryOption(
    ["--device"],
    help_group="Farm Options",
    help="Serve this device from FARM_DEVICES (e.g. cuda0) as `farm worker --device` does: pinned to it, "
    "named after it, one pool child. `-Q cuda0` alone implies it.",
)


class DeviceWorkerRefused(ValueError):
    """A worker command the farm cannot run as asked; the message says what to run instead."""


@dataclass(frozen=True)
class DevicePlan:
    """What a plain Celery worker becomes: the device it serves, its name and the queues it consumes."""

    queue: str
    hostname: str
    queues: list[str]
    inferred: bool


def _instead(queue: str) -> str:
    return (
        f"run `celery -A farm.celery_app worker --device {queue}` (or `farm worker --device {queue}`), "
        "one worker per device"
    )


def plan_device_worker(
    settings: Settings,
    *,
    device: str | None,
    consuming: set[str],
    hostname: str,
    concurrency: Any,
    prefork: bool,
    autoscale: Any = None,
    pinned_queue: str = "",
) -> DevicePlan | None:
    """Decide what a worker started with these options serves; None when it takes no slices (the control
    worker) or was pinned already (`farm worker`, which starts Celery pinned). Raises DeviceWorkerRefused
    with what to run instead when the options would make a worker take slices unpinned or as something else.
    """
    from farm.placement import device_worker_queues, is_model_queue

    if pinned_queue:
        if device and device != pinned_queue:
            raise DeviceWorkerRefused(f"--device {device}: this process is already pinned to {pinned_queue}")
        return None
    devices = set(settings.devices)
    named = sorted(consuming & devices)
    qc = sorted(q for q in consuming if q.startswith(QC_PREFIX))
    if qc:
        raise DeviceWorkerRefused(
            f"{qc[0]} is a QC worker's queue (FARM_QC=worker): run `farm worker --device "
            f"{qc[0][len(QC_PREFIX) :].split('@')[0]} --qc`, or let the device worker start it"
        )
    if device is None:
        takes_slices = SLICES_QUEUE in consuming or any(is_model_queue(q) for q in consuming)
        if not named and not takes_slices:
            return None
        if len(named) != 1:
            which = f"-Q names {', '.join(named)}" if named else "-Q names the shared slices queue"
            example = named[0] if named else sorted(devices)[0]
            raise DeviceWorkerRefused(
                f"{which}, but a worker that takes slices must be pinned to one device: {_instead(example)}"
            )
        device, inferred = named[0], True
    else:
        inferred = False
    if device not in devices:
        known = ", ".join(sorted(devices))
        raise DeviceWorkerRefused(f"--device {device} is not in FARM_DEVICES (known: {known})")
    default_only = consuming == {CONTROL_QUEUE}  # no -Q: Celery's default queue, replaced by the device's
    name, _, host = hostname.partition("@")
    own = local_queue(device, host or None)
    others = sorted(
        q
        for q in consuming
        if q not in (device, own, SLICES_QUEUE) and not is_model_queue(q) and not default_only
    )
    if others:
        raise DeviceWorkerRefused(
            f"a device worker takes only its device queue ({device}), {SLICES_QUEUE} and model queues, not "
            f"{', '.join(others)}: run the control worker apart (`farm worker --control`); {_instead(device)}"
        )
    if concurrency not in (None, 0, 1, "1"):
        raise DeviceWorkerRefused(
            f"-c {concurrency}: a device worker runs one pool child, which holds the device's models; "
            "drop -c (throughput comes from one worker per device)"
        )
    if autoscale:
        raise DeviceWorkerRefused("--autoscale: a device worker runs exactly one pool child; drop it")
    if not prefork:
        raise DeviceWorkerRefused(
            "a device worker needs the prefork pool (time limits, a child restarted when it dies, models "
            "loaded after the fork): drop -P"
        )
    if name not in ("celery", device):
        raise DeviceWorkerRefused(
            f"-n {hostname}: the farm finds a device's workers by their name, {device}@<host>; drop -n "
            f"or use -n {device}@%h"
        )
    return DevicePlan(
        queue=device,
        hostname=own,
        queues=device_worker_queues(
            device, settings.preload_generator, settings.preload_dtype, host=host or None
        ),
        inferred=inferred,
    )


class DeviceWorker(bootsteps.Step):
    """Pins a plain `celery worker` to its device and names, sizes and feeds it as `farm worker` does, or
    refuses to start it (see the module's docstring for why this runs in time)."""

    name = "farm.device"

    def __init__(self, parent: Any, device: str | None = None, **kwargs: Any) -> None:
        from celery.app import trace
        from celery.concurrency.prefork import TaskPool

        from farm.config import load_settings

        super().__init__(parent, **kwargs)
        settings = load_settings()
        app = parent.app
        try:
            plan = plan_device_worker(
                settings,
                device=device,
                consuming=set(app.amqp.queues.consume_from),
                hostname=parent.hostname,
                concurrency=kwargs.get("concurrency"),
                prefork=isinstance(parent.pool_cls, type) and issubclass(parent.pool_cls, TaskPool),
                autoscale=kwargs.get("autoscale"),
                pinned_queue=os.environ.get("FARM_PINNED_QUEUE", ""),
            )
        except DeviceWorkerRefused as exc:
            raise click.UsageError(str(exc)) from None
        if plan is None:
            return
        self._pin(plan, settings)
        parent.hostname = plan.hostname
        parent.concurrency = parent.min_concurrency = 1
        app.amqp.queues.select(plan.queues)
        parent.options.update(without_gossip=True, without_mingle=True)
        trace.setup_worker_optimizations(app, plan.hostname)
        how = f"-Q {plan.queue} names a device" if plan.inferred else f"--device {plan.queue}"
        log.warning(
            "%s: pinned to %s as %s, one pool child, consuming %s",
            how,
            settings.devices[plan.queue],
            plan.hostname,
            ", ".join(plan.queues),
        )

    @staticmethod
    def _pin(plan: DevicePlan, settings: Settings) -> None:
        from farm.db import migrate
        from farm.gpu_pinning.pinning import apply_pinning, plan_pinning

        try:
            apply_pinning(plan_pinning(plan.queue, settings.devices, settings.worker_threads))
        except RuntimeError as exc:  # torch imported already: too late to hide the other devices
            raise click.UsageError(f"{exc}; start it with `farm worker --device {plan.queue}`") from None
        migrate(settings.database_url)
