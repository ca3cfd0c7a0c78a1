"""The Celery app's settings as the real workers apply them: task events stay off until a monitor asks."""

from __future__ import annotations

import threading
import time

import pytest
from celery.events import EventReceiver

from farm.celery_app import app_for

pytestmark = pytest.mark.slow

ONE = """
name: events
model: tiny
defaults: {candidates: 2, steps: 2, size: 64x64, seed: 5}
items:
  - a kettle on a stove
"""


class _Events:
    """Every task event on the broker while the block runs (a real receiver, as Flower's)."""

    def __init__(self, app) -> None:
        self.app, self.seen = app, []

    def __enter__(self) -> _Events:
        self.conn = self.app.connection_for_read()
        self.receiver = EventReceiver(self.conn, handlers={"*": self.seen.append}, app=self.app)
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10), "the event receiver did not start"
        return self

    def _run(self, ready: threading.Event) -> None:
        consumer = self.receiver.consume(limit=None, timeout=None, wakeup=False)
        next(consumer)  # subscribed once the first wait for events is over
        ready.set()
        for _ in consumer:
            pass

    def __exit__(self, *exc) -> None:
        time.sleep(1.5)  # the last task-succeeded event is published after the batch row closes
        self.receiver.should_stop = True
        self.thread.join(10)
        self.conn.release()

    def slices(self) -> set[str]:
        return {e["type"] for e in self.seen if e.get("type", "").startswith("task-")}


def test_workers_send_no_task_events_until_a_monitor_enables_them_as_flower_does(settings, run_batch):
    app = app_for(settings)
    with _Events(app) as quiet:
        run_batch(ONE)
    assert quiet.slices() == set(), "task events cost every slice a few ms; they must be off by default"
    # What Flower broadcasts every 5 s while it runs (flower.events.Events.on_enable_events).
    app.control.enable_events()
    try:
        with _Events(app) as watched:
            run_batch(ONE)
        assert {"task-received", "task-started", "task-succeeded"} <= watched.slices()
        # As Flower lists them: the slice's four stage tasks, one chain (each the parent of the next), each
        # succeeded with its own runtime on the device worker, then the rank on the control worker.
        received = {e["uuid"]: e for e in watched.seen if e["type"] == "task-received"}
        succeeded = {e["uuid"]: e for e in watched.seen if e["type"] == "task-succeeded"}
        by_name = {e["name"]: e for e in received.values()}
        stages = ["farm.generate", "farm.moderate", "farm.validate", "farm.score"]
        assert sorted(by_name) == sorted([*stages, "farm.rank", "farm.dispatch_batch"]), sorted(by_name)
        for parent, child in zip(stages, [*stages[1:], "farm.rank"]):
            assert by_name[child]["parent_id"] == by_name[parent]["uuid"], child
            assert by_name[child]["root_id"] == by_name["farm.generate"]["root_id"]
        for name in stages:
            done = succeeded[by_name[name]["uuid"]]
            assert done["runtime"] > 0 and done["hostname"].startswith("cuda"), (name, done)
        hosts = {succeeded[by_name[name]["uuid"]]["hostname"] for name in stages}
        assert len(hosts) == 1, f"FARM_QC=inline: the worker that generated checks the slice ({hosts})"
        assert succeeded[by_name["farm.rank"]["uuid"]]["hostname"].startswith("control@")
    finally:
        app.control.disable_events()
