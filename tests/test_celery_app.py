"""The Celery app's settings as the real workers apply them: task events stay off until a monitor asks."""

from __future__ import annotations

import pytest

from farm.celery_app import app_for
from tests.celery_events import TaskEvents

pytestmark = pytest.mark.slow

REAP = "farm.reap"

ONE = """
name: events
model: tiny
defaults: {candidates: 2, steps: 2, size: 64x64, seed: 5}
items:
  - a kettle on a stove
"""


def test_workers_send_no_task_events_until_a_monitor_enables_them_as_flower_does(settings, run_batch):
    app = app_for(settings)
    with TaskEvents(app) as quiet:
        run_batch(ONE)
    assert quiet.slices() == set(), "task events cost every slice a few ms; they must be off by default"
    # What Flower broadcasts every 5 s while it runs (flower.events.Events.on_enable_events).
    app.control.enable_events()
    try:
        with TaskEvents(app) as watched:
            run_batch(ONE)
        assert {"task-received", "task-started", "task-succeeded"} <= watched.slices()
        # As Flower lists them: the slice's four stage tasks, one chain (each the parent of the next), each
        # succeeded with its own runtime on the device worker, then the rank on the control worker.
        # farm.reap comes from beat whenever its interval falls in the window: not this batch's.
        tasks = watched.tasks().items()
        by_name = {t["name"]: {**t, "id": tid} for tid, t in tasks if t.get("name") not in (None, REAP)}
        stages = ["farm.generate", "farm.moderate", "farm.validate", "farm.score"]
        assert sorted(by_name) == sorted([*stages, "farm.rank", "farm.dispatch_batch"]), sorted(by_name)
        for parent, child in zip(stages, [*stages[1:], "farm.rank"], strict=True):
            assert by_name[child]["parent_id"] == by_name[parent]["id"], child
            assert by_name[child]["root_id"] == by_name["farm.generate"]["root_id"]
        for name in stages:
            assert by_name[name]["runtime"] > 0 and by_name[name]["hostname"].startswith("cuda"), name
        hosts = {by_name[name]["hostname"] for name in stages}
        assert len(hosts) == 1, f"FARM_QC=inline: the worker that generated checks the slice ({hosts})"
        assert by_name["farm.rank"]["hostname"].startswith("control@")
    finally:
        app.control.disable_events()


MANY = """
name: order
model: tiny
priority: 9
defaults: {candidates: 4, steps: 2, size: 64x64, seed: 6}
items:
  - a kettle on a stove
  - a teapot on a table
  - a jug by a window
"""


def test_a_device_worker_checks_each_slice_it_generated_before_it_takes_the_next_generate(
    settings, run_batch
):
    # FARM_QC=inline: the checks go to the worker's own queue, which it serves first, so its images wait in
    # memory for at most one slice. Six slices over two devices: each worker's tasks run in chain order.
    # Priority 9 sends the generates at kombu's step 0 too, where only the order of the queues decides.
    app = app_for(settings)
    run_batch(ONE)  # the session's workers are up and consuming their broadcasts
    replies = app.control.enable_events(reply=True, timeout=5)
    assert len(replies) >= 3, replies  # two device workers and the control worker
    try:
        with TaskEvents(app) as watched:
            run_batch(MANY)
    finally:
        app.control.disable_events()
    names = {tid: t["name"] for tid, t in watched.tasks().items() if "name" in t}
    started: dict[str, list[str]] = {}
    for e in watched.seen:
        if (
            e["type"] == "task-started"
            and names.get(e["uuid"], "").startswith("farm.")
            and e["hostname"].startswith("cuda")
        ):
            started.setdefault(e["hostname"], []).append(names[e["uuid"]].removeprefix("farm."))
    chain = ["generate", "moderate", "validate", "score"]
    assert sum(len(seq) for seq in started.values()) == 6 * 4, started
    for worker, seq in started.items():
        assert seq == chain * (len(seq) // 4), (worker, seq)
