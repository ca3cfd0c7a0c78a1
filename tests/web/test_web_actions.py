"""Retry and resume from the API and the batch page: the SQL they write and the messages they put on a real
Redis (no workers here; tests/browser/test_stack_actions.py runs both through real workers)."""

from __future__ import annotations

from sqlalchemy import select, update
from web_helpers import csrf_from, queued_messages

from farm.db import Batch, Candidate, Item, session_scope


def _cands(settings, batch_id: str) -> dict[str, Candidate]:
    with session_scope(settings.database_url) as s:
        return {c.id: c for c in s.scalars(select(Candidate).where(Candidate.batch_id == batch_id))}


def _task_args(messages: list[dict]) -> list[tuple[str, str]]:
    return [(m["headers"]["task"], m["headers"]["argsrepr"]) for m in messages]


# -- retry ---------------------------------------------------------------------------------------------------


def test_retry_resets_failed_candidates_reopens_items_and_sends_them(client, settings, make_batch, broker):
    made = make_batch("done")
    before = _cands(settings, made.batch_id)
    failed = sorted(cid for cid, c in before.items() if c.status == "failed")
    assert len(failed) == 2
    with session_scope(settings.database_url) as s:  # as after the reaper gave up on them
        s.execute(update(Item).where(Item.batch_id == made.batch_id).values(resends=3))
    r = client.post(f"/api/v1/batches/{made.batch_id}/retry")
    assert r.status_code == 202 and r.json == {"id": made.batch_id, "retried": 2}

    after = _cands(settings, made.batch_id)
    for cid in failed:
        c = after[cid]
        assert (c.status, c.error, c.stage, c.stage_attempts) == ("pending", None, None, {})
        assert c.attempts == before[cid].attempts  # the record of how often it ran is kept
    # The survivors go back to 'scored' so the item is ranked again as a whole; rejected ones stay rejected.
    assert {after[cid].status for cid, c in before.items() if c.status == "passed"} == {"scored"}
    assert all(after[cid].status == "rejected" for cid, c in before.items() if c.status == "rejected")
    with session_scope(settings.database_url) as s:
        batch = s.get(Batch, made.batch_id)
        items = s.scalars(select(Item).where(Item.batch_id == made.batch_id)).all()
        assert (batch.status, batch.items_done, batch.finished_at) == ("running", 0, None)
        assert {(it.status, it.finished_at, it.resends) for it in items} == {("running", None, 0)}

    sent = _task_args(queued_messages(broker, "slices"))  # each slice's chain, sent as its first stage
    assert [task for task, _ in sent] == ["farm.generate", "farm.generate"]
    assert sorted(cid for _, args in sent for cid in failed if cid in args) == failed


def test_retry_twice_is_refused_the_second_time(client, make_batch, broker):
    made = make_batch("done")
    assert client.post(f"/api/v1/batches/{made.batch_id}/retry").status_code == 202
    r = client.post(f"/api/v1/batches/{made.batch_id}/retry")
    assert r.status_code == 409 and "running" in r.json["errors"][0]["message"]


def test_retry_without_failed_candidates_changes_nothing(client, settings, make_batch, broker):
    made = make_batch("done")
    with session_scope(settings.database_url) as s:
        s.execute(
            update(Candidate)
            .where(Candidate.batch_id == made.batch_id, Candidate.status == "failed")
            .values(status="rejected")
        )
    r = client.post(f"/api/v1/batches/{made.batch_id}/retry")
    assert r.status_code == 200 and r.json == {"id": made.batch_id, "retried": 0}
    with session_scope(settings.database_url) as s:
        assert s.get(Batch, made.batch_id).status == "done"
    assert queued_messages(broker, "slices") == []


def test_retry_refuses_unfinished_batches_and_unknown_ids(client, make_batch):
    for kind in ("running", "queued", "cancelled"):
        made = make_batch(kind)
        r = client.post(f"/api/v1/batches/{made.batch_id}/retry")
        assert r.status_code == 409, kind
        assert r.json["errors"][0]["path"] is None and "only a done batch" in r.json["errors"][0]["message"]
    r = client.post("/api/v1/batches/nope/retry")
    assert r.status_code == 404 and r.json["errors"][0]["message"] == "no batch 'nope'"


def test_retry_with_the_broker_down_is_503_and_says_to_resume(client, settings, make_batch, broker_down):
    made = make_batch("done")
    r = client.post(f"/api/v1/batches/{made.batch_id}/retry")
    assert r.status_code == 503
    assert "Resume" in r.json["errors"][0]["message"]
    # The rows were reset first (one transaction), so Resume or the reaper can send them later.
    with session_scope(settings.database_url) as s:
        assert s.get(Batch, made.batch_id).status == "running"


# -- resume --------------------------------------------------------------------------------------------------


def test_resume_resends_unsettled_candidates_of_running_items(client, settings, make_batch, broker):
    made = make_batch("running")
    r = client.post(f"/api/v1/batches/{made.batch_id}/resume")
    assert r.status_code == 202 and r.json == {"id": made.batch_id, "messages": 1}
    sent = _task_args(queued_messages(broker, "slices"))
    assert sent and {task for task, _ in sent} == {"farm.generate"}
    running_item = made.item_ids[1]
    resent = {cid for _, args in sent for cid in made.candidate_ids if cid in args}
    # Candidate 0 is scored (settled), 1 is generated and 2, 3 are pending: those three go again.
    assert resent == {f"{running_item}-{k:03d}" for k in (1, 2, 3)}
    assert queued_messages(broker, "control") == []
    # Resuming again is harmless: the stages skip what is done. It sends the same again.
    assert client.post(f"/api/v1/batches/{made.batch_id}/resume").status_code == 202


def test_resume_of_a_queued_batch_resends_its_dispatch(client, make_batch, broker):
    made = make_batch("queued")
    r = client.post(f"/api/v1/batches/{made.batch_id}/resume")
    assert r.status_code == 202 and r.json["messages"] == 1
    sent = _task_args(queued_messages(broker, "control"))
    assert sent == [("farm.dispatch_batch", repr((made.batch_id,)))]


def test_resume_of_an_item_with_everything_settled_sends_its_rank(client, settings, make_batch, broker):
    made = make_batch("running")
    with session_scope(settings.database_url) as s:
        s.execute(update(Candidate).where(Candidate.item_id == made.item_ids[1]).values(status="scored"))
    r = client.post(f"/api/v1/batches/{made.batch_id}/resume")
    assert r.status_code == 202
    assert _task_args(queued_messages(broker, "control")) == [("farm.rank", repr((made.item_ids[1],)))]
    assert queued_messages(broker, "slices") == []


def test_resume_refuses_closed_batches_and_unknown_ids(client, make_batch):
    for kind in ("done", "cancelled"):
        made = make_batch(kind)
        r = client.post(f"/api/v1/batches/{made.batch_id}/resume")
        assert r.status_code == 409 and "only a queued or running batch" in r.json["errors"][0]["message"]
    assert client.post("/api/v1/batches/nope/resume").status_code == 404


def test_resume_with_the_broker_down_is_503(client, make_batch, broker_down):
    made = make_batch("queued")
    r = client.post(f"/api/v1/batches/{made.batch_id}/resume")
    assert r.status_code == 503 and "broker" in r.json["errors"][0]["message"]


# -- the batch page's buttons --------------------------------------------------------------------------------


def test_batch_page_buttons_follow_the_status(client, make_batch):
    done = client.get(f"/batches/{make_batch('done').batch_id}").get_data(as_text=True)
    assert 'id="retry-failed"' in done and 'id="resume-batch"' not in done
    running = client.get(f"/batches/{make_batch('running').batch_id}").get_data(as_text=True)
    assert 'id="resume-batch"' in running and 'id="cancel-batch"' in running
    assert 'id="retry-failed"' not in running


def test_ui_retry_needs_csrf_then_flashes(client, settings, make_batch, broker):
    made = make_batch("done")
    assert client.post(f"/batches/{made.batch_id}/retry").status_code == 400
    with session_scope(settings.database_url) as s:
        assert s.get(Batch, made.batch_id).status == "done"
    token = csrf_from(client.get(f"/batches/{made.batch_id}").get_data(as_text=True))
    r = client.post(f"/batches/{made.batch_id}/retry", data={"csrf_token": token}, follow_redirects=True)
    assert r.status_code == 200 and "Retrying 2 failed candidates." in r.get_data(as_text=True)
    again = client.post(f"/batches/{made.batch_id}/retry", data={"csrf_token": token}, follow_redirects=True)
    assert "only a done batch" in again.get_data(as_text=True)


def test_ui_resume_needs_csrf_then_flashes(client, make_batch, broker):
    made = make_batch("running")
    assert client.post(f"/batches/{made.batch_id}/resume").status_code == 400
    token = csrf_from(client.get(f"/batches/{made.batch_id}").get_data(as_text=True))
    r = client.post(f"/batches/{made.batch_id}/resume", data={"csrf_token": token}, follow_redirects=True)
    assert "Resumed: re-sent the unfinished work (1 message)." in r.get_data(as_text=True)
    assert client.post("/batches/nope/resume", data={"csrf_token": token}).status_code == 404


def test_ui_actions_with_the_broker_down_flash_the_error(client, make_batch, broker_down):
    made = make_batch("queued")
    token = csrf_from(client.get(f"/batches/{made.batch_id}").get_data(as_text=True))
    r = client.post(f"/batches/{made.batch_id}/resume", data={"csrf_token": token}, follow_redirects=True)
    assert r.status_code == 200 and "flash-error" in r.get_data(as_text=True)
    assert "broker did not take" in r.get_data(as_text=True)
