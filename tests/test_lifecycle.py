"""A worker's life as bootsteps (farm.lifecycle): which steps a control, device and QC worker run, that each
starts once however often the consumer restarts, and the SIGTERM a device worker drains on. The workers
themselves, started for real, are in tests/test_worker.py and tests/gpu_pinning/test_celery_worker.py."""

from __future__ import annotations

import signal
import socket
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from celery.utils.imports import symbol_by_name
from celery.worker.consumer.consumer import Consumer

from farm import lifecycle, worker
from farm.broker import CONTROL_QUEUE, SLICES_QUEUE, local_queue, qc_queue
from farm.celery_app import LIFECYCLE_STEPS, app
from farm.lifecycle import WorkerKind, worker_kind

HOST = socket.gethostname()
DEVICE_QUEUES = {local_queue("cuda0", HOST), "cuda0", SLICES_QUEUE}


def _parent(consuming: set[str]) -> SimpleNamespace:
    return SimpleNamespace(
        app=SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(consume_from=consuming)))
    )


def _steps_of(consuming: set[str]) -> set[str]:
    parent = _parent(consuming)
    names = set()
    for steps in LIFECYCLE_STEPS.values():
        for path in steps:
            step = symbol_by_name(path)(parent)
            if step.include_if(parent):
                names.add(type(step).__name__)
    return names


@pytest.mark.parametrize(
    ("consuming", "env", "kind"),
    [
        ({CONTROL_QUEUE}, {}, WorkerKind.CONTROL),
        (DEVICE_QUEUES, {"FARM_PINNED_QUEUE": "cuda0"}, WorkerKind.DEVICE),
        ({qc_queue("cuda0", HOST)}, {"FARM_PINNED_QUEUE": "cuda0", "FARM_PINNED_ROLE": "qc"}, WorkerKind.QC),
        ({"other"}, {}, WorkerKind.OTHER),
    ],
)
def test_a_worker_is_told_apart_by_its_pinning_and_the_queues_it_consumes(consuming, env, kind):
    assert worker_kind(consuming, env) == kind


@pytest.mark.parametrize("qc", ["inline", "worker"])
def test_each_kind_of_worker_runs_its_own_steps_and_no_others(monkeypatch, qc):
    monkeypatch.setenv("FARM_QC", qc)
    monkeypatch.delenv("FARM_PINNED_QUEUE", raising=False)
    monkeypatch.delenv("FARM_PINNED_ROLE", raising=False)
    assert _steps_of({CONTROL_QUEUE}) == {"ReapOnStart"}
    assert _steps_of({"other"}) == set()

    monkeypatch.setenv("FARM_PINNED_QUEUE", "cuda0")
    device = {"FollowModelQueues", "DrainOnSigterm", "SweepHandoff"}
    assert _steps_of(DEVICE_QUEUES) == device | ({"QcWorkerBeside"} if qc == "worker" else set())

    monkeypatch.setenv("FARM_PINNED_ROLE", "qc")
    assert _steps_of({qc_queue("cuda0", HOST)}) == set()


def test_the_app_adds_the_steps_and_the_consumer_starts_them_after_its_task_consumer():
    for blueprint, steps in LIFECYCLE_STEPS.items():
        assert set(steps) <= {str(s) for s in app.steps[blueprint]}
    bp = Consumer.Blueprint(steps=app.steps["consumer"])
    bp.steps = bp.claim_steps()  # as Blueprint.apply does, which the order is read from here
    order = [s.name for s in bp._finalize_steps(bp.steps)]
    at = order.index
    assert at("celery.worker.consumer.tasks.Tasks") < at("farm.model_queues") < at("farm.drain_on_sigterm")
    assert max(at(n) for n in ("farm.reap_on_start", "farm.sweep_handoff", "farm.drain_on_sigterm")) < at(
        "celery.worker.consumer.consumer.Evloop"
    )


def test_a_consumer_step_begins_once_through_reconnects_and_ends_at_shutdown(monkeypatch):
    calls: list[str] = []

    class Probe(lifecycle.OnceReady):
        kinds = frozenset({WorkerKind.DEVICE})

        def begin(self, consumer: Any) -> None:
            calls.append("begin")

        def end(self, consumer: Any) -> None:
            calls.append("end")

    consumer = _parent(DEVICE_QUEUES)
    step = Probe(consumer)
    step.start(consumer)
    step.stop(consumer)  # the broker connection was lost: Celery restarts the consumer's steps
    step.start(consumer)
    assert calls == ["begin"]
    step.stop(consumer)
    step.shutdown(consumer)
    assert calls == ["begin", "end"]


def test_the_first_sigterm_drains_and_a_second_goes_to_celerys_handler(monkeypatch):
    drained = threading.Event()
    to_celery: list[int] = []
    monkeypatch.setattr(worker, "drain_then_stop", lambda *a, **kw: drained.set())
    before = signal.signal(signal.SIGTERM, lambda signum, frame: to_celery.append(signum))
    try:
        worker.SigtermDrain(app, f"cuda0@{HOST}", "cuda0", timeout=1.0).install()
        ours = signal.getsignal(signal.SIGTERM)
        assert callable(ours)
        ours(signal.SIGTERM, None)
        assert drained.wait(5) and to_celery == []
        ours(signal.SIGTERM, None)
        assert to_celery == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)
