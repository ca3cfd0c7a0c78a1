"""A worker's life beyond its tasks, as Celery bootsteps: one step per concern, each deciding from the worker
itself (the queues it consumes, the pinning `farm worker` or the ``DeviceWorker`` step set in its environment)
whether it applies, and doing nothing where it does not.

=====================  =====================================================  =======  ======  ===
step                   its one job                                            control  device  QC
=====================  =====================================================  =======  ======  ===
``ReapOnStart``        send one farm.reap: resume what a crash left half-done  yes
``FollowModelQueues``  consume the model queues of what the pool child holds           yes
``DrainOnSigterm``     the first SIGTERM drains, then Celery's warm shutdown           yes
``SweepHandoff``       remove handed-off images no QC task will read                   yes
``QcWorkerBeside``     FARM_QC=worker: run the device's QC worker beside it            yes
=====================  =====================================================  =======  ======  ===

The parts themselves live in farm.worker; farm.celery_app adds these steps to every worker by name, so a
process that only sends (the web, the CLI) never imports them. They run the same under `farm worker --device
cuda0` and a plain `celery -A farm.celery_app worker --device cuda0`. A QC worker takes only its own queue and
stops with Celery's warm shutdown, which finishes its slice: none applies to it.

Not a step: the model preload. Steps run in the worker's main process, and models load in its pool child,
after the fork (no CUDA context in a process that forks): that stays ``worker_process_init`` in
farm.tasks.runtime. Nor the embedded beat's lifeline (farm.worker), which runs in the beat's own process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, ClassVar

from celery import bootsteps

from farm.broker import CONTROL_QUEUE
from farm.canvas import reap_signature
from farm.config import load_settings
from farm.worker import HandoffSweeper, ModelQueues, QcCompanion, SigtermDrain, follow_model_queues

log = logging.getLogger(__name__)


class WorkerKind(StrEnum):
    """What a worker process is to the farm, which decides the steps it runs."""

    CONTROL = "control"  # consumes the control queue, pinned to no device: dispatch, rank, reap
    DEVICE = "device"  # pinned to a device (FARM_PINNED_QUEUE): generates, and checks unless FARM_QC=worker
    QC = "qc"  # a device's QC worker (FARM_PINNED_ROLE=qc): checks what its device worker hands off
    OTHER = "other"  # anything else started from the app (a worker of other queues): none of the farm's steps


def worker_kind(consuming: Iterable[str], env: Mapping[str, str] | None = None) -> WorkerKind:
    """The kind of a worker consuming ``consuming``, pinned as ``env`` says (this process's by default)."""
    env = os.environ if env is None else env
    if env.get("FARM_PINNED_QUEUE"):
        return WorkerKind.QC if env.get("FARM_PINNED_ROLE") == "qc" else WorkerKind.DEVICE
    return WorkerKind.CONTROL if CONTROL_QUEUE in set(consuming) else WorkerKind.OTHER


def _kind_of(parent: Any) -> WorkerKind:
    return worker_kind(parent.app.amqp.queues.consume_from or ())


class OnceReady(bootsteps.StartStopStep):
    """A consumer step whose concern starts the first time the worker's consumer starts (connected, its task
    consumer set up) and lasts until the worker shuts down.

    Once, because the consumer stops and starts its steps again after a lost broker connection
    (celery/worker/consumer/consumer.py, ``Consumer.start``), and the threads and the signal handler these
    steps start must outlive that, as they did when a ``worker_ready`` handler started them (sent once).
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)
    #: The kinds of worker this step applies to.
    kinds: ClassVar[frozenset[WorkerKind]] = frozenset()

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.begun = False

    def include_if(self, parent: Any) -> bool:
        return _kind_of(parent) in self.kinds

    def start(self, parent: Any) -> None:
        if not self.begun:
            self.begun = True
            self.begin(parent)

    def stop(self, parent: Any) -> None:
        """A lost connection (or the first half of the shutdown): the concern carries on."""

    def shutdown(self, parent: Any) -> None:
        if self.begun:
            try:
                self.end(parent)
            except Exception as exc:  # the worker is going anyway; let the other steps shut down
                log.warning("%s at shutdown: %s", self.alias, exc)

    def begin(self, consumer: Any) -> None:
        raise NotImplementedError

    def end(self, consumer: Any) -> None:
        """At the worker's shutdown; most concerns are daemon threads that end with the process."""


class ReapOnStart(OnceReady):
    """The control worker sends one farm.reap as it starts, so what a crash left half-done resumes now rather
    than at the first beat (FARM_REAPER_INTERVAL later)."""

    name = "farm.reap_on_start"
    kinds = frozenset({WorkerKind.CONTROL})

    def begin(self, consumer: Any) -> None:
        try:
            reap_signature(consumer.app).apply_async()
        except Exception:  # the beat's reap comes anyway
            log.exception("could not send the reap at start")


class FollowModelQueues(OnceReady):
    """A device worker consumes the model queues of the generators its pool child holds (farm.worker
    ``ModelQueues``): started once the consumer exists, since it adds and cancels the consumer's queues."""

    name = "farm.model_queues"
    kinds = frozenset({WorkerKind.DEVICE})

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.follower: ModelQueues | None = None

    def begin(self, consumer: Any) -> None:
        queue = os.environ["FARM_PINNED_QUEUE"]
        self.follower = follow_model_queues(consumer, queue, load_settings().database_url)

    def end(self, consumer: Any) -> None:
        if self.follower is not None:
            self.follower.stop()


class DrainOnSigterm(OnceReady):
    """A device worker's first SIGTERM drains it before Celery's warm shutdown; a second goes to Celery
    (farm.worker ``SigtermDrain``). After ``FollowModelQueues``: the drain stops taking slices through it."""

    name = "farm.drain_on_sigterm"
    requires = (FollowModelQueues,)
    kinds = frozenset({WorkerKind.DEVICE})

    def begin(self, consumer: Any) -> None:
        queue = os.environ["FARM_PINNED_QUEUE"]
        timeout = float(load_settings().drain_timeout)
        SigtermDrain(consumer.app, consumer.hostname, queue, timeout=timeout).install()


class SweepHandoff(OnceReady):
    """A device worker removes the handed-off images of its host that no QC task will read (farm.worker
    ``HandoffSweeper``), whatever FARM_QC says now."""

    name = "farm.sweep_handoff"
    kinds = frozenset({WorkerKind.DEVICE})

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.sweeper: HandoffSweeper | None = None

    def begin(self, consumer: Any) -> None:
        self.sweeper = HandoffSweeper(load_settings())
        self.sweeper.start()

    def end(self, consumer: Any) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()


class QcWorkerBeside(bootsteps.StartStopStep):
    """FARM_QC=worker: a device worker runs its device's QC worker beside it (farm.worker ``QcCompanion``),
    so one command per device stays the whole deployment, however the device worker was started.

    A worker step, started as the worker starts, before its consumer. It does nothing at the worker's stop:
    ``QcCompanion`` stops the QC worker at exit, after the drain and the pool's last task, whose checks it may
    still run.
    """

    name = "farm.qc_worker"

    def include_if(self, parent: Any) -> bool:
        return _kind_of(parent) == WorkerKind.DEVICE and load_settings().qc == "worker"

    def start(self, parent: Any) -> None:
        settings = load_settings()
        QcCompanion(os.environ["FARM_PINNED_QUEUE"], stop_timeout=float(settings.drain_timeout)).start()

    def stop(self, parent: Any) -> None:
        """Nothing here: see the class docstring."""
