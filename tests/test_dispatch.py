"""The canvas a batch becomes, and the rows it writes, checked without running workers."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select, update

from farm import dispatch
from farm import manifest as manifest_module
from farm.broker import CONTROL_QUEUE, SLICES_QUEUE
from farm.config import load_settings
from farm.db import Batch, Candidate, Item, session_scope
from farm.manifest import ManifestError

MANIFEST = """
name: shape
model: tiny
defaults: {candidates: 5, steps: 1, size: 64x64, seed: 7}
items:
  - a red fox
  - prompt: a lighthouse
    candidates: 2
"""


STAGE_TASKS = ["farm.generate", "farm.moderate", "farm.validate", "farm.score"]


def test_item_chord_has_one_stage_chain_per_slice_and_ranks_on_control():
    from farm.celery_app import app

    sig = dispatch.item_chord("b", "b-00000", [f"c{i}" for i in range(5)], slice_size=2, priority=4, app=app)
    header = list(sig.tasks)
    assert len(header) == 3
    for part, ids in zip(header, (["c0", "c1"], ["c2", "c3"], ["c4"]), strict=True):
        assert [t.task for t in part.tasks] == STAGE_TASKS
        generate = part.tasks[0]
        assert generate.args[0] == {"batch_id": "b", "item_id": "b-00000", "candidates": ids}
        assert generate.options["queue"] == SLICES_QUEUE and generate.options["priority"] == 4
    assert sig.body.task == "farm.rank"
    assert sig.body.options["queue"] == CONTROL_QUEUE
    assert sig.body.immutable and sig.body.args == ("b-00000",)


def test_an_item_of_one_slice_is_the_chain_of_its_stages_then_rank_not_a_one_part_chord():
    from celery.canvas import _chain

    from farm.celery_app import app

    sig = dispatch.item_chord("b", "b-00000", ["c0", "c1"], slice_size=2, priority=4, app=app)
    assert isinstance(sig, _chain)
    *stages, then = sig.tasks
    assert [t.task for t in stages] == STAGE_TASKS
    first = stages[0]
    assert first.args[0]["candidates"] == ["c0", "c1"]
    assert first.options["queue"] == SLICES_QUEUE and first.options["priority"] == 4
    assert then.task == "farm.rank" and then.immutable and then.args == ("b-00000",)
    assert then.options["queue"] == CONTROL_QUEUE and then.options["priority"] == 4


def test_slices_cover_every_candidate_once_in_order():
    ids = [str(i) for i in range(11)]
    parts = dispatch.slices(ids, 4)
    assert parts == [ids[0:4], ids[4:8], ids[8:11]]


def test_manifest_priority_nine_is_served_first_by_redis():
    assert dispatch.celery_priority(9) == 0
    assert dispatch.celery_priority(0) == 9


def test_create_batch_writes_batch_items_and_candidates_in_one_go(monkeypatch, tmp_path):
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    from farm.db import migrate

    migrate(settings.database_url)
    manifest, items = dispatch.plan(MANIFEST, settings=settings)
    done = dispatch.create_batch(manifest, items, MANIFEST, settings=settings)
    assert (done.items, done.candidates) == (2, 7)
    with session_scope(settings.database_url) as s:
        batch = s.get(Batch, done.batch_id)
        assert batch.status == "queued" and batch.candidates_total == 7 and batch.items_total == 2
        assert s.scalar(select(func.count()).select_from(Item).where(Item.batch_id == done.batch_id)) == 2
        cands = s.scalars(select(Candidate).where(Candidate.batch_id == done.batch_id)).all()
        assert len(cands) == 7
        assert all(c.status == "pending" for c in cands)
        assert len({c.seed for c in cands}) == 7
        assert {c.id for c in cands} == {f"{done.batch_id}-00000-{k:03d}" for k in range(5)} | {
            f"{done.batch_id}-00001-{k:03d}" for k in range(2)
        }


def test_a_dry_run_and_a_plan_expand_the_manifest_once(monkeypatch, tmp_path):
    """A templated manifest of many items costs its expansion once per reader, not once per step."""
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    expansions = []
    real = manifest_module._plan
    monkeypatch.setattr(manifest_module, "_plan", lambda m, *more: expansions.append(m) or real(m, *more))
    text = (
        "name: sweep\ndefaults: {candidates: 2}\nitems:\n"
        "  - template: 'a {animal} in {style}'\n    vars: {animal: [cat, fox], style: [ink, oil, clay]}\n"
    )
    summary = dispatch.dry_run(text, settings=settings)
    assert (summary["items"], summary["candidates"], len(expansions)) == (6, 12, 1)
    manifest, items = dispatch.plan(text, settings=settings)
    assert len(items) == 6 and len(expansions) == 2


def test_invalid_manifest_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    from farm.db import migrate

    migrate(settings.database_url)
    with pytest.raises(ManifestError) as err:
        dispatch.submit(MANIFEST.replace("size: 64x64", "size: 65x64"), settings=settings)
    assert "size" in str(err.value)
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Batch)) == 0
        assert s.scalar(select(func.count()).select_from(Candidate)) == 0


def test_unknown_model_is_refused_before_anything_is_written(monkeypatch, tmp_path):
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    with pytest.raises(ManifestError) as err:
        dispatch.plan(MANIFEST.replace("model: tiny", "model: not-a-model"), settings=settings)
    assert "model" in str(err.value)


def test_a_cancel_committed_while_dispatch_loops_stops_it_before_the_next_items_chord(monkeypatch, tmp_path):
    """The loop re-checks the batch with each item's flip: after the cancel commits, no further chord goes
    out, and the items not sent stay pending for the ranks the cancel sent to close."""
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    from farm.db import migrate

    migrate(settings.database_url)
    text = MANIFEST.replace("  - prompt: a lighthouse", "  - a kite\n  - a tram\n  - prompt: a lighthouse")
    manifest, items = dispatch.plan(text, settings=settings)
    batch_id = dispatch.create_batch(manifest, items, text, settings=settings).batch_id
    sent: list[str] = []

    def send_then_cancel(batch: str, iid: str, ids: list[str], **_kwargs: object) -> None:
        sent.append(iid)
        with session_scope(settings.database_url) as s:  # what dispatch.cancel commits, as the user clicks
            s.execute(update(Batch).where(Batch.id == batch).values(status="cancelling"))

    monkeypatch.setattr(dispatch, "send_item", send_then_cancel)
    assert dispatch.dispatch_batch(batch_id, settings=settings) == 1
    assert sent == [dispatch.item_id(batch_id, 0)]
    with session_scope(settings.database_url) as s:
        statuses = s.scalars(select(Item.status).where(Item.batch_id == batch_id).order_by(Item.index)).all()
    assert statuses == ["running", "pending", "pending", "pending"]
