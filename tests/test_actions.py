"""Resume pressed again and again while a slice is still generating: what it re-sends, and what the re-sent
deliveries count. SQL only; the messages resume would send are recorded instead of sent."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update

from farm import actions, dispatch, records
from farm.config import load_settings
from farm.db import Batch, Candidate, Item, migrate, session_scope

MANIFEST = """
name: resume
model: tiny
defaults: {candidates: 3, steps: 1, size: 32x32}
items:
  - "a kite"
"""
GENERATING = records.Claim(owner="cuda0@gpu-box pid 4242", seconds=600)  # a live holder renews its lease
TWIN = records.Claim(owner="cuda1@gpu-box pid 4343", seconds=600)


@pytest.fixture
def running(monkeypatch, tmp_path) -> tuple[object, str, list[str], list[list[str]]]:
    """A running batch of one item of three pending candidates; ``sent`` records resume's messages."""
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    migrate(settings.database_url)
    manifest, items = dispatch.plan(MANIFEST, settings=settings)
    batch_id = dispatch.create_batch(manifest, items, MANIFEST, settings=settings).batch_id
    with session_scope(settings.database_url) as s:
        s.execute(update(Batch).where(Batch.id == batch_id).values(status="running"))
        s.execute(update(Item).where(Item.batch_id == batch_id).values(status="running"))
        ids = sorted(s.scalars(select(Candidate.id).where(Candidate.batch_id == batch_id)))
    sent: list[list[str]] = []
    monkeypatch.setattr(dispatch, "send_item", lambda _b, _i, cids, **_kw: sent.append(list(cids)))
    return settings, batch_id, ids, sent


def _generate_attempts(url: str, ids: list[str]) -> dict[str, tuple[str, int]]:
    with session_scope(url) as s:
        rows = s.scalars(select(Candidate).where(Candidate.id.in_(ids))).all()
        return {c.id: (c.status, (c.stage_attempts or {}).get("generate", 0)) for c in rows}


def test_resume_pressed_three_times_while_a_live_worker_generates_the_slice_resends_none_of_it(running):
    settings, batch_id, ids, sent = running
    url = settings.database_url
    start = records.begin_stages(url, ids[:2], ("generate",), max_attempts=3, claim=GENERATING)
    assert [c.id for c in start.todo] == ids[:2]
    for _ in range(3):
        actions.resume(batch_id, settings=settings)
    # The held slice goes nowhere; the third candidate, whose message no live process holds, goes each time.
    assert sent == [[ids[2]]] * 3
    assert _generate_attempts(url, ids[:2]) == {cid: ("pending", 1) for cid in ids[:2]}


def test_a_resent_twin_delivered_while_the_slice_generates_counts_no_attempt_and_fails_nothing(running):
    """A re-send that went out anyway (pressed before the holder took its lease, or by an older version):
    its deliveries leave the live holder's candidates to it, so three of them cannot reach
    FARM_MAX_ATTEMPTS=3 (before leases each counted a start, and the third failed a healthy candidate)."""
    settings, _batch_id, ids, _sent = running
    url = settings.database_url
    records.begin_stages(url, ids, ("generate",), max_attempts=3, claim=GENERATING)
    for _ in range(3):
        twin = records.begin_stages(url, ids, ("generate",), max_attempts=3, claim=TWIN)
        assert twin.todo == [] and sorted(twin.held_elsewhere) == ids
    assert _generate_attempts(url, ids) == {cid: ("pending", 1) for cid in ids}
