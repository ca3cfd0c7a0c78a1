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


#: A slice whose recipe fills every field of A1111's text: a negative prompt, a swapped scheduler, a
#: fractional CFG scale, a size that is not square, a prompt with a comma.
A1111_MANIFEST = """
name: infotext
model: tiny
defaults:
  {candidates: 2, steps: 2, size: 32x48, guidance: 6.5, scheduler: euler_a, negative_prompt: "blurry, dark"}
items: ["a red fox, in the snow"]
"""


def test_the_pngs_the_generate_stage_stores_read_back_in_sd_parsers_with_the_models_hash(
    monkeypatch, tmp_path
):
    """The real stage on the real tiny model: what PNG Info, Civitai and sd-parsers read from the stored file
    is the recipe's prompt, negative prompt, steps, sampler, CFG scale, seed, size and model hash."""
    import io

    from sd_parsers import ParserManager

    from farm import dispatch
    from farm.config import load_settings
    from farm.db import migrate
    from farm.ml.hashes import folder_hash
    from farm.ml.layout import TINY_FOLDERS

    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    settings = load_settings()
    migrate(settings.database_url)
    manifest, items = dispatch.plan(A1111_MANIFEST, settings=settings)
    done = dispatch.create_batch(manifest, items, A1111_MANIFEST, settings=settings)
    with session_scope(settings.database_url) as s:
        rows = s.scalars(select(Candidate).where(Candidate.batch_id == done.batch_id)).all()
        seeds = {c.id: c.seed for c in rows}
    start = records.begin_stages(
        settings.database_url,
        sorted(seeds),
        ("generate",),
        max_attempts=3,
        claim=records.Claim("cuda0@a pid 1", 60),
    )
    runtime = Runtime(settings)
    out = _generated(runtime, start)

    tiny_hash = folder_hash(settings.models_dir / TINY_FOLDERS["tiny"])
    store = store_for(settings)
    for cid, seed in seeds.items():
        recipe = out[cid]["recipe"]
        assert recipe["model_hash"] == tiny_hash and len(tiny_hash) == 10
        data = store.read_bytes(out[cid]["image_path"])
        info = ParserManager().parse(io.BytesIO(data))
        assert info is not None and info.generator.value == "AUTOMATIC1111"
        (sampler,) = info.samplers
        assert [p.value for p in sampler.prompts] == ["a red fox, in the snow"]
        assert [p.value for p in sampler.negative_prompts] == ["blurry, dark"]
        assert (sampler.name, sampler.parameters["scheduler"]) == ("Euler a", "DDIM")
        assert (sampler.parameters["steps"], sampler.parameters["cfg_scale"]) == ("2", "6.5")
        assert sampler.parameters["seed"] == str(seed)
        assert info.metadata["Size"] == "32x48"
        assert (sampler.model.name, sampler.model.hash) == ("tiny", tiny_hash)
        # The sidecar carries the hash too, beside the whole recipe.
        sidecar = json.loads(store.read_bytes(out[cid]["image_path"].removesuffix(".png") + ".json"))
        assert sidecar == json.loads(json.dumps(recipe))
