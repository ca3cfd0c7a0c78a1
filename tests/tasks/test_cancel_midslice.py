"""A cancel stops a slice mid-generation, through the embedded Redis and real `farm worker` subprocesses: the
slice's worker reads the cancel between denoising steps (farm.tasks.interrupt), its candidates end cancelled
with no image, the item and batch close within seconds, and the device takes the next batch. While a slice
generates, its worker's row shows the denoising step it has reached."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from farm import dispatch
from farm.db import Batch, Candidate, Item, Worker, session_scope

pytestmark = pytest.mark.slow

#: One slice of two candidates (FARM_SLICE_SIZE=2) of 150 steps at 192x192 on the tiny model: about a second a
#: step on one CPU thread, so the slice alone runs for minutes (its pace is measured below, not assumed).
LONG = """
name: long-slice
model: tiny
defaults: {candidates: 2, steps: 150, size: 192x192, seed: 5}
items:
  - a lighthouse in a storm
"""

NEXT = """
name: after-cancel
model: tiny
defaults: {candidates: 2, steps: 2, size: 64x64, seed: 6}
items:
  - a kite
"""


def _generating(settings, cand_ids: list[str]) -> Worker | None:
    """The worker whose row says it generates the slice of ``cand_ids``."""
    with session_scope(settings.database_url) as s:
        for w in s.scalars(select(Worker)):
            if w.current and w.current.startswith("farm.generate") and any(c in w.current for c in cand_ids):
                s.expunge(w)
                return w
    return None


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_a_cancel_stops_the_generating_slice_within_seconds_and_frees_its_device(settings, stack, wait_batch):
    done = dispatch.submit(LONG, settings=settings)
    with session_scope(settings.database_url) as s:
        cand_ids = list(s.scalars(select(Candidate.id).where(Candidate.batch_id == done.batch_id)))
    assert len(cand_ids) == 2

    # Per-step progress: the generating worker's row shows the step, and it moves.
    first = _wait(
        lambda: (w := _generating(settings, cand_ids)) and w.step is not None and w,
        300,
        "the generating worker to report a denoising step",
    )
    t1, step1 = time.monotonic(), first.step
    assert first.steps == 150 and 1 <= step1 < 150
    second = _wait(
        lambda: (w := _generating(settings, cand_ids)) and (w.step or 0) > step1 and w,
        60,
        "the reported step to move",
    )
    t2, step2 = time.monotonic(), second.step
    assert second.name == first.name
    seconds_per_step = (t2 - t1) / (step2 - step1)
    left = (150 - step2) * seconds_per_step  # what the slice would still have run without the interrupt

    t_cancel = time.monotonic()
    assert dispatch.cancel(done.batch_id, settings=settings)
    assert wait_batch(done.batch_id, timeout=120) == "cancelled"
    took = time.monotonic() - t_cancel
    assert left > 60, f"the slice was too fast to show anything ({seconds_per_step:.2f} s a step)"
    assert took < 30, f"the cancelled batch took {took:.1f}s to close; the slice had about {left:.0f}s left"

    with session_scope(settings.database_url) as s:
        cands = s.scalars(select(Candidate).where(Candidate.batch_id == done.batch_id)).all()
        items = s.scalars(select(Item).where(Item.batch_id == done.batch_id)).all()
        batch = s.get(Batch, done.batch_id)
    assert {c.status for c in cands} == {"cancelled"}
    assert all(c.image_path is None and c.stage == "generate" for c in cands)
    assert all(c.lease_expires_at is None for c in cands)
    assert [it.status for it in items] == ["cancelled"] and batch.finished_at is not None
    folder = settings.artifacts_dir / done.batch_id
    assert not (folder.exists() and list(folder.glob("*.png")))

    # The device is free at once: its worker's row is idle (its progress cleared) and it takes new work.
    def idle() -> Worker | None:
        with session_scope(settings.database_url) as s:
            w = s.get(Worker, first.name)
            s.expunge(w)
        return w if not (w.current and any(c in w.current for c in cand_ids)) else None

    after = _wait(idle, 30, "the generating worker to leave the cancelled slice")
    assert after.step is None or after.current is not None
    nxt = dispatch.submit(NEXT, settings=settings)
    assert wait_batch(nxt.batch_id, timeout=300) == "done"
