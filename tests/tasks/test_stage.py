"""run_stages on real SQL with stand-in stage work (no models are needed to pin down the order of writes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from sqlalchemy import select

from farm import dispatch, records
from farm.config import load_settings
from farm.db import Candidate, migrate, session_scope
from farm.tasks import runtime as runtime_module
from farm.tasks.runtime import Runtime
from farm.tasks.stage import Stage, run_stages

MANIFEST = 'name: stage\nmodel: tiny\ndefaults: {candidates: 3, steps: 1, size: 32x32}\nitems: ["a kite"]\n'


@pytest.fixture
def one_slice(monkeypatch, tmp_path) -> tuple[str, list[str]]:
    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    migrate(settings.database_url)
    manifest, items = dispatch.plan(MANIFEST, settings=settings)
    done = dispatch.create_batch(manifest, items, MANIFEST, settings=settings)
    monkeypatch.setattr(runtime_module, "_runtime", Runtime(settings))
    with session_scope(settings.database_url) as s:
        ids = sorted(s.scalars(select(Candidate.id).where(Candidate.batch_id == done.batch_id)))
    return settings.database_url, ids


def _statuses(url: str, ids: list[str]) -> dict[str, str]:
    with session_scope(url) as s:
        return {c.id: c.status for c in s.scalars(select(Candidate).where(Candidate.id.in_(ids)))}


def test_a_settled_stage_is_written_after_the_next_stages_work_and_a_failed_side_effect_fails_its_candidate(
    one_slice,
):
    url, ids = one_slice
    events: list[str] = []

    def generate(start, cands):
        events.append("generate")
        return {c.id: {"image_path": f"b/{c.id}.png"} for c in cands}

    def settle(cands):
        events.append("settle")
        return {ids[1]: records.failure("generate", "could not store the image: disk full")}

    def moderate(start, cands):
        events.append("moderate")
        # The next stage sees what generate made before it is written; SQL does not yet.
        assert [c.image_path for c in cands] == [f"b/{i}.png" for i in ids]
        assert set(_statuses(url, ids).values()) == {"pending"}
        return {c.id: {"verdict": "ok"} for c in cands}

    stages = [Stage("generate", generate, settle=settle), Stage("moderate", moderate)]
    run_stages(SimpleNamespace(name="farm.slice"), {"candidates": ids}, stages)

    assert events == ["generate", "moderate", "settle"]
    with session_scope(url) as s:
        rows = {c.id: c for c in s.scalars(select(Candidate).where(Candidate.id.in_(ids)))}
    failed = rows[ids[1]]
    assert (failed.status, failed.stage) == ("failed", "generate")
    assert failed.error == "generate: could not store the image: disk full"
    assert failed.verdict is None, "its moderation result was dropped with it"
    for cid in (ids[0], ids[2]):
        row = rows[cid]
        assert (row.status, row.image_path, row.verdict) == ("moderated", f"b/{cid}.png", "ok")
        assert row.stage_attempts == {"generate": 1, "moderate": 1}
        assert set(row.timings) == {"generate", "moderate"}
