"""Task events as Flower receives them, for tests that check what a monitor sees of the farm's tasks."""

from __future__ import annotations

import threading
import time
from typing import Any

from celery.events import EventReceiver


class TaskEvents:
    """Every task event on the broker while the block runs (a real receiver, as Flower's)."""

    def __init__(self, app) -> None:
        self.app, self.seen = app, []

    def __enter__(self) -> TaskEvents:
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

    def tasks(self) -> dict[str, dict[str, Any]]:
        """Each task seen, by id: its received event's fields (name, parent and root ids) and, once it
        succeeded, ``runtime`` and ``hostname`` (the worker that ran it)."""
        out: dict[str, dict[str, Any]] = {}
        for e in self.seen:
            if e.get("type") == "task-received":
                out.setdefault(e["uuid"], {}).update(
                    name=e["name"], parent_id=e.get("parent_id"), root_id=e.get("root_id")
                )
            elif e.get("type") == "task-succeeded":
                out.setdefault(e["uuid"], {}).update(runtime=e["runtime"], hostname=e["hostname"])
        return out
