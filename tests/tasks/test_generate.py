"""The generate stage on the real tiny model and the real store: what it writes, and under which names."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import select, update

from farm import records
from farm.artifacts import store_for
from farm.db import Candidate, session_scope, utcnow
from farm.tasks.generate import generate_slice, settle_writes
from farm.tasks.runtime import Runtime

from .test_stage import one_slice, rt  # noqa: F401  (the fixtures: one batch of one item, three candidates)


def _generated(runtime: Runtime, start: records.StageStart) -> dict:
    out = generate_slice(runtime, start, start.todo)
    assert settle_writes(runtime, start.todo) == {}, "every PNG stored"
    return out


def test_a_holder_fenced_off_mid_write_cannot_overwrite_the_image_of_the_holder_that_took_over(
    one_slice,  # noqa: F811
    rt,  # noqa: F811
):
    """The race the lease's token guard cannot close alone: a holder whose pass ended inside its lease (its
    check passed) is paused before its PNG writes land; the lease runs out, another worker takes the slice
    over (here the reaper hands it on, and the new holder generates candidate 0 alone) and records it. Then
    the first holder's writes land. The row must still name the new holder's image, with its recipe."""
    url, ids = one_slice
    first = records.begin_stages(
        url, ids, ("generate",), max_attempts=3, claim=records.Claim("cuda0@a pid 1", 60)
    )
    with session_scope(url) as s:
        s.execute(update(Candidate).where(Candidate.id.in_(ids)).values(lease_expires_at=utcnow()))
    records.take_expired_leases(url, utcnow() + timedelta(seconds=1))
    second = records.begin_stages(
        url, ids[:1], ("generate",), max_attempts=3, claim=records.Claim("cuda1@b pid 2", 60)
    )
    assert (first.token, second.token) == (1, 3)

    taken_over = _generated(rt, second)
    (written,) = records.apply_stages(
        url,
        [
            records.StageWrite(
                "generate", taken_over, {"s": 0.1}, started={c.id: c for c in second.todo}, keeps=frozenset()
            )
        ],
    )
    assert [c.id for c in written] == ids[:1]
    late = _generated(rt, first)  # the fenced holder's writes land last

    with session_scope(url) as s:
        row = s.scalars(select(Candidate).where(Candidate.id == ids[0])).one()
    assert row.image_path == taken_over[ids[0]]["image_path"] != late[ids[0]]["image_path"]
    store = store_for(rt.settings)
    stored = json.loads(store.read_bytes(row.image_path.removesuffix(".png") + ".json"))
    assert stored["slice_seeds"] == [row.seed], "the image the row names is the new holder's (slice of one)"
    assert len(late[ids[0]]["recipe"]["slice_seeds"]) == 3
    assert store.exists(late[ids[0]]["image_path"]), (
        "the late file: named by no row, swept when the batch closes"
    )
