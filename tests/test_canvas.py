"""farm.canvas: the task names are exactly the tasks the workers register, and each builder sends what the
farm has always sent (the names and options queued messages and deployed workers depend on)."""

from __future__ import annotations

from farm import canvas
from farm.broker import CONTROL_QUEUE, SLICES_QUEUE
from farm.celery_app import app


def test_the_names_are_exactly_the_farm_tasks_the_workers_register():
    app.loader.import_default_modules()
    registered = sorted(n for n in app.tasks if n.startswith("farm."))
    assert registered == sorted(canvas.TASK_NAMES)
    assert set(canvas.CONTROL_TASKS) <= set(canvas.TASK_NAMES)


def test_the_wire_names_stay_what_queued_messages_carry():
    assert canvas.TASK_NAMES == (
        "farm.generate",
        "farm.moderate",
        "farm.validate",
        "farm.score",
        "farm.rank",
        "farm.dispatch_batch",
        "farm.reap",
    )


def test_routes_and_beat_send_the_control_tasks_to_the_control_queue():
    routes = app.conf.task_routes
    assert {name: route["queue"] for name, route in routes.items()} == dict.fromkeys(
        ("farm.rank", "farm.dispatch_batch", "farm.reap"), CONTROL_QUEUE
    )
    assert app.conf.beat_schedule["reap-stalled-work"]["task"] == "farm.reap"


def test_each_builder_gives_the_signature_its_callers_built_by_hand():
    same = [
        (
            canvas.rank_signature(app, "i", priority=4, immutable=True),
            app.signature("farm.rank", args=("i",), queue=CONTROL_QUEUE, priority=4, immutable=True),
        ),
        (
            canvas.rank_signature(app, "i", priority=4),
            app.signature("farm.rank", args=("i",), queue=CONTROL_QUEUE, priority=4),
        ),
        (canvas.rank_signature(app, "i"), app.signature("farm.rank", args=("i",), queue=CONTROL_QUEUE)),
        (
            canvas.dispatch_signature(app, "b", ignore_result=True),
            app.signature("farm.dispatch_batch", args=("b",), queue=CONTROL_QUEUE, ignore_result=True),
        ),
        (
            canvas.dispatch_signature(app, "b"),
            app.signature("farm.dispatch_batch", args=("b",), queue=CONTROL_QUEUE),
        ),
        (canvas.reap_signature(app), app.signature("farm.reap", queue=CONTROL_QUEUE)),
    ]
    for built, by_hand in same:
        assert dict(built) == dict(by_hand), built["task"]
        assert built.immutable == by_hand.immutable


def test_a_slice_is_the_chain_of_its_four_stage_tasks_each_given_the_payload():
    payload = {"batch_id": "b", "item_id": "b-00000", "candidates": ["c0", "c1"]}
    sent = canvas.slice_chain(app, payload, queue=SLICES_QUEUE, priority=3)
    assert [t["task"] for t in sent.tasks] == [
        "farm.generate",
        "farm.moderate",
        "farm.validate",
        "farm.score",
    ]
    for k, t in enumerate(sent.tasks):
        assert t.immutable and tuple(t.args) == (payload,), t["task"]
        assert t.options["queue"] == SLICES_QUEUE
        assert t.options.get("priority") == (3 if k == 0 else None), "only the first goes at the batch's"
    part = canvas.slice_chain(
        app, payload, queue="cuda0", priority=None, stages=("farm.generate", "farm.moderate")
    )
    assert [t["task"] for t in part.tasks] == ["farm.generate", "farm.moderate"]


def test_generate_sends_on_the_stage_tasks_of_its_chain_and_not_the_rank_after_them():
    payload = {"batch_id": "b", "item_id": "b-00000", "candidates": ["c0"]}
    whole = canvas.slice_chain(app, payload, queue=SLICES_QUEUE, priority=3) | canvas.rank_signature(
        app, "b-00000", immutable=True
    )
    # What a running generate finds in request.chain: the rest, last first, as plain dicts off the wire.
    rest = [dict(t, options=dict(t.options)) for t in reversed(whole.tasks[1:])]
    canvas.send_checks_to(rest, "cuda0@gpu-1")
    assert [(t["task"], t["options"]["queue"]) for t in rest] == [
        ("farm.rank", CONTROL_QUEUE),
        ("farm.score", "cuda0@gpu-1"),
        ("farm.validate", "cuda0@gpu-1"),
        ("farm.moderate", "cuda0@gpu-1"),
    ]
    canvas.send_checks_to(rest, None)
    assert rest[-1]["options"]["queue"] == "cuda0@gpu-1", "no queue of its own: the chain goes on as sent"
    canvas.send_checks_to(None, "cuda0@gpu-1")
