"""Retry, resume and the metrics through the API, against the session's real farm (embedded Redis, two CPU
device workers and the control worker, SQLite). Here rather than in tests/web because they need the
session-wide ``stack``, which tests/web's per-test FARM_HOME cannot share.

Which retry is meaningful: a fault marker in the prompt (``[[fault:moderate:raise:1]]``) fires on every
delivery, so retrying it can only show that a persistent failure fails again, with its attempts counted (the
second test). The case retry exists for is a failure that does not come back (a CUDA out-of-memory, a worker
that died, a model server that was down): that is simulated by failing a candidate of a finished batch in SQL,
and the retry must bring it back to the result it would have had (the first test).
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from farm import dispatch
from farm.db import Batch, Candidate, Item, ItemRound, session_scope
from farm.states import CANDIDATE_FINAL

pytestmark = pytest.mark.slow

MANIFEST = """\
name: {name}
model: tiny
defaults: {{candidates: 3, steps: 2, size: 64x64, seed: 13}}
items:
  - "{first}"
  - a lighthouse at dusk
selection: {{winners: 1}}
"""


@pytest.fixture(scope="module")
def api(stack: object) -> Any:
    from web import create_app

    return create_app({"TESTING": True}).test_client()


def _rows(settings, batch_id: str) -> tuple[Batch, list[Item], dict[str, Candidate]]:
    with session_scope(settings.database_url) as s:
        batch = s.get(Batch, batch_id)
        items = s.scalars(select(Item).where(Item.batch_id == batch_id).order_by(Item.index)).all()
        cands = {c.id: c for c in s.scalars(select(Candidate).where(Candidate.batch_id == batch_id))}
    return batch, list(items), cands


def test_retry_brings_back_a_candidate_that_failed_once(api, settings, run_batch, wait_batch):
    batch_id = run_batch(MANIFEST.format(name="retry-transient", first="a red fox in the snow"))
    _, items, before = _rows(settings, batch_id)
    untouched = items[1].finished_at
    winner_id = items[0].winners[0]
    won = before[winner_id]
    assert won.status == "passed" and won.rank == 1
    # The winner "fails" as a lost GPU would have failed it; the item is ranked without it.
    with session_scope(settings.database_url) as s:
        s.execute(
            update(Candidate)
            .where(Candidate.id == winner_id)
            .values(
                status="failed",
                stage="generate",
                error="generate: RuntimeError: CUDA out of memory",
                image_path=None,
                rank=None,
                is_winner=False,
            )
        )

    r = api.post(f"/api/v1/batches/{batch_id}/retry")
    assert r.status_code == 202 and r.json["retried"] == 1
    assert wait_batch(batch_id) == "done"

    batch, items, after = _rows(settings, batch_id)
    assert batch.items_done == batch.items_total == 2 and batch.finished_at is not None
    again = after[winner_id]
    assert again.status == "passed" and again.error is None and again.stage == "score"
    assert again.attempts > won.attempts  # its earlier runs are still counted
    assert (settings.artifacts_dir / again.image_path).is_file()
    # Same seed, same image, same scores: the item is ranked exactly as before the failure.
    assert items[0].winners == [winner_id] and again.is_winner and again.rank == 1
    assert {cid: c.rank for cid, c in after.items()} == {cid: c.rank for cid, c in before.items()}
    assert all(c.status in CANDIDATE_FINAL for c in after.values())
    assert items[1].finished_at == untouched  # the other item was not reopened
    # Its rounds: the first rank, the retry that reopened it (no winners, as the item had none meanwhile),
    # the rank after the retry; the latest round's winners are the item's.
    with session_scope(settings.database_url) as s:
        by_number = select(ItemRound).order_by(ItemRound.number)
        rounds = {it.id: s.scalars(by_number.where(ItemRound.item_id == it.id)).all() for it in items}
    assert [(r.kind, r.winners) for r in rounds[items[0].id]] == [
        ("ranked", [winner_id]),
        ("reopened", []),
        ("ranked", [winner_id]),
    ]
    assert [r.kind for r in rounds[items[1].id]] == ["ranked"]


def test_retry_of_a_persistent_fault_fails_again_with_its_attempts_counted(
    api, settings, run_batch, wait_batch
):
    faulty = "a cursed teapot [[fault:moderate:raise:1]]"
    batch_id = run_batch(MANIFEST.format(name="retry-fault", first=faulty))
    _, items, before = _rows(settings, batch_id)
    failed = [c for c in before.values() if c.status == "failed"]
    assert [(c.item_id, c.index, c.stage) for c in failed] == [(items[0].id, 1, "moderate")]
    first = failed[0]
    assert "injected fault" in first.error

    r = api.post(f"/api/v1/batches/{batch_id}/retry")
    assert r.status_code == 202 and r.json["retried"] == 1
    assert wait_batch(batch_id) == "done"

    batch, items, after = _rows(settings, batch_id)
    again = after[first.id]
    assert again.status == "failed" and again.stage == "moderate" and "injected fault" in again.error
    assert again.attempts >= first.attempts + 2  # generate and moderate ran once more
    assert batch.items_done == 2 and items[0].winners  # the item is ranked again from its survivors
    assert api.post(f"/api/v1/batches/{batch_id}/retry").json["retried"] == 1  # and may be retried again
    assert wait_batch(batch_id) == "done"


def test_resume_finishes_a_batch_whose_messages_were_lost(api, settings, stack, wait_batch):
    # Rows written as farm.dispatch writes them, but no message sent: item 0 as if the control worker died
    # right after flipping it to running, item 1 as if the dispatch message itself was lost.
    text = MANIFEST.format(name="resume", first="a red fox in the snow")
    manifest, plans = dispatch.plan(text, settings=settings)
    batch_id = dispatch.create_batch(manifest, plans, text, settings=settings).batch_id
    with session_scope(settings.database_url) as s:
        s.execute(update(Item).where(Item.id == dispatch.item_id(batch_id, 0)).values(status="running"))

    r = api.post(f"/api/v1/batches/{batch_id}/resume")
    assert r.status_code == 202 and r.json == {"id": batch_id, "messages": 2}
    assert wait_batch(batch_id) == "done"
    batch, items, cands = _rows(settings, batch_id)
    assert batch.items_done == 2 and all(it.status == "done" and it.winners for it in items)
    assert all(c.status in CANDIDATE_FINAL for c in cands.values())
    assert api.post(f"/api/v1/batches/{batch_id}/resume").status_code == 409  # done: nothing to resume


def test_metrics_of_the_running_farm(api, settings, run_batch):
    run_batch(MANIFEST.format(name="metrics", first="a red fox in the snow"))
    r = api.get("/metrics")
    assert r.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("farm_broker_up", ())] == 1
    assert samples[("farm_workers_live", ())] >= 2
    assert samples[("farm_candidates", (("status", "passed"),))] >= 6
    for queue in ("slices", "control", "cuda0", "cuda1"):
        assert ("farm_queue_length", (("queue", queue),)) in samples
    generate = [
        v
        for (name, labels), v in samples.items()
        if name == "farm_stage_duration_mean_seconds" and ("stage", "generate") in labels
    ]
    assert generate and all(v > 0 for v in generate)
    assert api.get("/healthz").json == {"ok": True, "database": "ok"}
