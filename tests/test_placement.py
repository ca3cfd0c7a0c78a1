"""Placement by model: a model's own queue, the routing choice, and real workers that keep to their models
(no reloading back and forth) yet leave no device idle while work waits."""

from __future__ import annotations

import time
from collections import Counter
from datetime import timedelta

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from farm import dispatch, placement
from farm.broker import SLICES_QUEUE, device_workers
from farm.celery_app import app
from farm.cli import cli
from farm.config import load_settings
from farm.db import Batch, Candidate, Worker, migrate, session_scope, utcnow

TINY = placement.batch_model_queue("tiny", {"dtype": "fp32", "memory": {}})
XL = placement.batch_model_queue("tiny-xl", {"dtype": "fp32", "memory": {}})


# ------------------------------------------------------------------------------------------- naming


def test_a_model_queue_is_named_from_the_registry_key_stably_and_safely():
    key = placement.generator_key("tiny")
    assert key == "generator:tiny:fp32:00"
    queue = placement.model_queue(key)
    assert queue == placement.model_queue(key) == TINY
    assert queue.startswith("slices.m.tiny-fp32-00-") and len(queue) == len("slices.m.tiny-fp32-00-") + 8
    assert placement.is_model_queue(queue) and not placement.is_model_queue(SLICES_QUEUE)
    odd = placement.model_queue(placement.generator_key("/models/My Model:v2 (ünïcode)", dtype="fp16"))
    assert ":" not in odd and " " not in odd and odd.isascii()
    # Names that differ only in characters the readable part drops still get queues of their own.
    assert placement.model_queue("generator:a/b:fp32:00") != placement.model_queue("generator:a_b:fp32:00")
    long = placement.model_queue(placement.generator_key("x" * 400))
    assert len(long) < 70


def test_dtype_and_memory_savers_make_a_different_model_and_queue():
    plain = placement.batch_model_queue("tiny", {"dtype": "fp32", "memory": {}})
    assert plain == placement.preload_queue("tiny")
    assert placement.batch_model_queue("tiny", {"dtype": "fp16", "memory": {}}) != plain
    sliced = {"dtype": "fp32", "memory": {"attention_slicing": True, "cpu_offload": False}}
    assert placement.batch_model_queue("tiny", sliced) != plain
    assert placement.batch_model_queue("tiny", None) == plain
    # A worker preloading fp16 consumes the queue that fp16 batches of that model are routed to.
    half = placement.batch_model_queue("tiny", {"dtype": "fp16", "memory": {}})
    assert placement.preload_queue("tiny", "fp16") == half != placement.preload_queue("tiny")


def test_only_generators_have_model_queues():
    keys = ["generator:tiny:fp32:00", "validator:tiny-clip", "scorer:tiny-aesthetic", "moderation:nudenet"]
    assert placement.generator_queues(keys) == {TINY}


# ------------------------------------------------------------------------------------------- routing


def test_slices_go_to_the_model_queue_only_when_a_fresh_worker_consumes_it():
    now = utcnow()
    fresh, stale = now - timedelta(seconds=2), now - timedelta(seconds=placement.FRESH_S + 5)
    holder = (["cuda0", SLICES_QUEUE, TINY], fresh)
    assert placement.choose_queue(TINY, [holder], now=now) == TINY
    assert placement.choose_queue(XL, [holder], now=now) == SLICES_QUEUE, "nobody holds it"
    assert placement.choose_queue(TINY, [(["cuda0", SLICES_QUEUE, TINY], stale)], now=now) == SLICES_QUEUE
    assert placement.choose_queue(TINY, [(["cuda0"], fresh)], now=now) == SLICES_QUEUE, "drained"
    assert placement.choose_queue(TINY, [(None, fresh), (None, None)], now=now) == SLICES_QUEUE
    assert placement.choose_queue(TINY, [], now=now) == SLICES_QUEUE


def _worker(name: str, queues: list[str] | None, age: float) -> Worker:
    return Worker(
        name=name,
        queue=name.split("@")[0],
        device="cpu",
        pid=1,
        hostname="h",
        models={},
        loaded=[],
        queues=queues,
        tasks_done=0,
        started_at=utcnow(),
        heartbeat_at=utcnow() - timedelta(seconds=age),
    )


def test_route_reads_the_workers_table(temp_db):
    with session_scope(temp_db) as s:
        s.add(_worker("cuda0@h", ["cuda0", SLICES_QUEUE, TINY], age=1))
        s.add(_worker("cuda1@h", ["cuda1", SLICES_QUEUE, XL], age=placement.FRESH_S + 60))
    fp32 = {"dtype": "fp32", "memory": {"attention_slicing": False, "cpu_offload": False}}
    assert placement.route(temp_db, "tiny", fp32) == TINY
    assert placement.route(temp_db, "tiny-xl", fp32) == SLICES_QUEUE, "only a dead worker holds it"
    assert placement.route(temp_db, "tiny", {**fp32, "dtype": "fp16"}) == SLICES_QUEUE


def test_item_chord_sends_every_slice_to_the_routed_queue():
    sig = dispatch.item_chord("b", "b-00000", ["c0", "c1", "c2"], slice_size=2, priority=4, app=app, queue=XL)
    # Each slice is a chain: its generate goes to the routed queue (the checks follow it to its host).
    assert [t.tasks[0].options["queue"] for t in sig.tasks] == [XL, XL]


def test_active_model_queues_are_those_of_open_batches(monkeypatch, tmp_path):
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    migrate(settings.database_url)
    text = "name: q\nmodel: tiny-xl\ndefaults: {candidates: 1, steps: 1, size: 64x64}\nitems: [a]\n"
    manifest, items = dispatch.plan(text, settings=settings)
    open_one = dispatch.create_batch(manifest, items, text, settings=settings).batch_id
    closed = dispatch.create_batch(manifest, items, text, settings=settings).batch_id
    with session_scope(settings.database_url) as s:
        s.get(Batch, closed).status = "done"
    active = placement.ActiveModelQueues(settings.database_url)
    assert active() == {XL}
    with session_scope(settings.database_url) as s:
        s.get(Batch, open_one).status = "cancelled"
    assert active() == set()


# ------------------------------------------------------------------------------------------- real workers


def manifest(name: str, items: int, model: str = "tiny", candidates: int = 4) -> str:
    prompts = "\n".join(f"  - {name} prompt {i}" for i in range(items))
    defaults = f"{{candidates: {candidates}, steps: 2, size: 64x64}}"
    return f"name: {name}\nmodel: {model}\ndefaults: {defaults}\nitems:\n{prompts}\n"


def _row(settings, queue: str) -> Worker:
    with session_scope(settings.database_url) as s:
        return s.scalars(select(Worker).where(Worker.queue == queue)).one()


def _generator_loads(settings, queue: str) -> dict[str, int]:
    models = _row(settings, queue).models
    return {k.split(":")[1]: v for k, v in models.items() if k.startswith("generator:")}


def _wait_consuming(settings, expected: dict[str, set[str]], timeout: float = 60) -> None:
    """Until each device's row shows exactly these model queues consumed."""
    deadline = time.monotonic() + timeout
    while True:
        got = {
            q: {m for m in (_row(settings, q).queues or []) if placement.is_model_queue(m)} for q in expected
        }
        if got == expected:
            return
        assert time.monotonic() < deadline, (got, expected)
        time.sleep(0.3)


def _rows(settings, batch_id: str) -> list[Candidate]:
    with session_scope(settings.database_url) as s:
        return s.scalars(select(Candidate).where(Candidate.batch_id == batch_id)).all()


def _all_done_once(settings, batch_id: str, expected: int) -> list[Candidate]:
    rows = _rows(settings, batch_id)
    assert len(rows) == expected and len({c.id for c in rows}) == expected
    assert {c.status for c in rows} <= {"passed", "rejected", "failed"}
    return rows


@pytest.fixture(scope="module")
def one_generator_each(stack):
    """Both device workers restarted with a memory budget that fits one generator."""
    env = {"FARM_MODEL_BUDGET_MB": "1"}
    stack.restart_worker("cuda0", env)
    stack.restart_worker("cuda1", env)
    try:
        deadline = time.monotonic() + 180
        while not all(device_workers(app, q) for q in ("cuda0", "cuda1")):
            assert time.monotonic() < deadline, "device workers did not answer ping"
            time.sleep(1)
        yield stack
    finally:
        CliRunner().invoke(cli, ["undrain", "cuda1"])
        stack.restart_worker("cuda0")
        stack.restart_worker("cuda1")


def _run_only_on(device: str, text: str, run_batch) -> None:
    """Run a batch with the other device drained."""
    other = {"cuda0": "cuda1", "cuda1": "cuda0"}[device]
    runner = CliRunner()
    assert runner.invoke(cli, ["drain", other]).exit_code == 0
    try:
        run_batch(text)
    finally:
        assert runner.invoke(cli, ["undrain", other]).exit_code == 0


def _load_xl_on_cuda0_only(settings, run_batch) -> None:
    # cuda1 may hold tiny-xl from an earlier test (it takes the last slices of whatever waits): give it tiny.
    _run_only_on("cuda1", manifest("tiny-warm", items=1), run_batch)
    _run_only_on("cuda0", manifest("xl-warm", items=1, model="tiny-xl"), run_batch)
    _wait_consuming(settings, {"cuda0": {XL}, "cuda1": {TINY}})
    # The budget fits one generator: tiny made room for tiny-xl, and the heartbeat says what is loaded now.
    assert [k for k in _row(settings, "cuda0").loaded if k.startswith("generator:")] == [
        placement.generator_key("tiny-xl")
    ]


@pytest.mark.slow
def test_slices_go_to_the_device_that_has_their_model_and_nothing_is_reloaded_back_and_forth(
    settings, one_generator_each, wait_batch, run_batch
):
    _load_xl_on_cuda0_only(settings, run_batch)
    before = {q: _generator_loads(settings, q) for q in ("cuda0", "cuda1")}
    xl = dispatch.submit(manifest("xl-mix", items=8, model="tiny-xl"), settings=settings)
    tiny = dispatch.submit(manifest("tiny-mix", items=8), settings=settings)
    assert wait_batch(xl.batch_id) == "done" and wait_batch(tiny.batch_id) == "done"
    xl_on = Counter(c.device for c in _all_done_once(settings, xl.batch_id, 32))
    tiny_on = Counter(c.device for c in _all_done_once(settings, tiny.batch_id, 32))
    after = {q: _generator_loads(settings, q) for q in ("cuda0", "cuda1")}
    new_loads = {q: sum(after[q].values()) - sum(before[q].values()) for q in after}
    report = {"xl": dict(xl_on), "tiny": dict(tiny_on), "before": before, "after": after}
    # Each model stays where it was loaded; the one that finishes first may take the other's last slices
    # (one load), but nobody alternates: without placement by model each slice could mean a reload.
    assert xl_on["cuda0"] >= 0.75 * 32 and tiny_on["cuda1"] >= 0.75 * 32, report
    assert all(n <= 1 for n in new_loads.values()), report


@pytest.mark.slow
def test_an_idle_device_takes_slices_of_a_model_it_does_not_have(settings, one_generator_each, run_batch):
    _load_xl_on_cuda0_only(settings, run_batch)
    before = _generator_loads(settings, "cuda1").get("tiny-xl", 0)
    batch_id = run_batch(manifest("xl-long", items=12, model="tiny-xl"))
    on = Counter(c.device for c in _all_done_once(settings, batch_id, 48))
    assert on["cuda0"] and on["cuda1"] >= 8, on
    # The counts are the worker's lifetime totals: an earlier test in this module may have loaded tiny-xl on
    # cuda1 already (its last slices), so only this batch's loads are compared.
    after = _generator_loads(settings, "cuda1")
    assert after.get("tiny-xl", 0) - before == 1, (before, after)
