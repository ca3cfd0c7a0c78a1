"""Whole batches through the embedded Redis and real `farm worker` subprocesses on two CPU-backed devices."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from farm.artifacts import image_name, read_recipe
from farm.db import Batch, Candidate, Item, Worker, session_scope
from tests.test_manifest import BATCHES

pytestmark = pytest.mark.slow

BASIC = """
name: e2e
model: tiny
defaults: {candidates: 4, steps: 2, size: 64x64, seed: 11}
items:
  - a red fox in the snow
  - a lighthouse at dusk
  - template: "a {animal} in watercolor"
    vars: {animal: [cat, owl]}
"""


def _rows(settings, batch_id):
    with session_scope(settings.database_url) as s:
        batch = s.get(Batch, batch_id)
        items = s.scalars(select(Item).where(Item.batch_id == batch_id).order_by(Item.index)).all()
        cands = s.scalars(
            select(Candidate).where(Candidate.batch_id == batch_id).order_by(Candidate.id)
        ).all()
    return batch, items, cands


def test_batch_runs_to_done_with_every_candidate_recorded_once(settings, run_batch):
    batch_id = run_batch(BASIC)
    batch, items, cands = _rows(settings, batch_id)
    assert batch.status == "done" and batch.items_done == 4 and batch.finished_at is not None
    assert len(cands) == 16 and len({c.id for c in cands}) == 16
    assert {c.status for c in cands} <= {"passed", "rejected", "failed"}
    for c in cands:
        if c.status == "failed":
            continue
        png = settings.artifacts_dir / c.image_path
        assert png.exists() and png.with_suffix(".json").exists()
        assert read_recipe(png)["seed"] == c.seed
        assert c.device in ("cuda0", "cuda1") and c.pdq_hash and len(c.moderation) >= 2
        assert set(c.timings) >= {"generate", "moderate"}
    passed = [c for c in cands if c.status == "passed"]
    assert passed, "the tiny models pass at least some candidates with the default thresholds"
    for c in passed:
        assert c.alignment is not None and c.preference is not None and c.score is not None and c.rank >= 1
    for it in items:
        assert it.status == "done"
        mine = sorted((c for c in passed if c.item_id == it.id), key=lambda c: c.rank)
        if mine:
            assert it.winners == [mine[0].id] and mine[0].is_winner
            assert [c.rank for c in mine] == list(range(1, len(mine) + 1))
            assert mine[0].score == max(c.score for c in mine)
    assert not list(settings.artifacts_dir.joinpath(batch_id).glob(".*.tmp"))


def test_every_stage_of_a_slice_runs_on_the_device_that_generated_it(settings, run_batch):
    batch_id = run_batch(BASIC.replace("name: e2e", "name: pinning"))
    _batch, _items, cands = _rows(settings, batch_id)
    for c in cands:
        queues = {t["queue"] for t in c.timings.values()}
        assert queues == {c.device}, (c.id, c.timings)


def test_same_manifest_gives_the_same_pixels(settings, run_batch):
    first = run_batch(BASIC.replace("name: e2e", "name: det-a"))
    second = run_batch(BASIC.replace("name: e2e", "name: det-b"))
    _, _, a = _rows(settings, first)
    _, _, b = _rows(settings, second)
    for ca, cb in zip(a, b, strict=True):
        assert ca.seed == cb.seed
        pa = np.asarray(Image.open(settings.artifacts_dir / ca.image_path))
        pb = np.asarray(Image.open(settings.artifacts_dir / cb.image_path))
        assert np.array_equal(pa, pb), (ca.id, cb.id)
        assert ca.score == cb.score and ca.status == cb.status


def test_a_stage_failing_for_one_candidate_fails_only_it_and_the_item_still_ranks(settings, run_batch):
    manifest = """
name: one-fails
model: tiny
defaults: {candidates: 4, steps: 1, size: 64x64}
items:
  - "a quiet harbour [[fault:moderate:raise:1]]"
"""
    batch_id = run_batch(manifest)
    batch, items, cands = _rows(settings, batch_id)
    assert batch.status == "done" and items[0].status == "done"
    by_index = {c.index: c for c in cands}
    assert by_index[1].status == "failed" and "injected fault in moderate" in by_index[1].error
    assert by_index[1].stage == "moderate"
    others = [by_index[i] for i in (0, 2, 3)]
    assert all(c.status in ("passed", "rejected") for c in others)
    assert items[0].winners and items[0].winners[0] != by_index[1].id


def test_a_blocked_prompt_never_reaches_generation(settings, run_batch):
    manifest = """
name: blocked
model: tiny
defaults: {candidates: 3, steps: 1, size: 64x64}
moderation: {blocked_terms: [gore]}
items:
  - a bowl of fruit
  - some gore on the floor
"""
    batch_id = run_batch(manifest)
    _batch, items, cands = _rows(settings, batch_id)
    blocked = [c for c in cands if c.item_id == items[1].id]
    assert all(c.status == "rejected" and c.image_path is None for c in blocked)
    assert all("prompt_terms" in c.reasons[0] for c in blocked)
    assert items[1].status == "done" and items[1].winners == []


def test_each_worker_loads_each_model_once_across_batches(settings, run_batch):
    run_batch(BASIC.replace("name: e2e", "name: loads"))
    with session_scope(settings.database_url) as s:
        workers = s.scalars(select(Worker)).all()
    serving = [w for w in workers if w.tasks_done]
    assert serving
    for w in serving:
        assert w.models and set(w.models.values()) == {1}, (w.name, w.models)


def test_an_item_short_of_min_accepted_gets_a_top_up_round_with_new_seeds(settings, run_batch):
    manifest = """
name: topup
model: tiny
defaults: {candidates: 4, steps: 1, size: 64x64}
selection: {winners: 1, min_accepted: 2, max_topup_rounds: 2}
items:
  - "a tin robot [[fault:validate:raise:0]] [[fault:validate:raise:1]] [[fault:validate:raise:2]]
     [[fault:validate:raise:3]]"
"""
    batch_id = run_batch(manifest)
    batch, items, cands = _rows(settings, batch_id)
    assert items[0].rounds == 1 and batch.candidates_total == 8 and len(cands) == 8
    first = [c for c in cands if c.round == 0]
    second = [c for c in cands if c.round == 1]
    assert all(c.status == "failed" for c in first)
    assert [c.index for c in second] == [4, 5, 6, 7] and all(c.status == "passed" for c in second)
    assert len({c.seed for c in cands}) == 8
    assert items[0].winners and items[0].winners[0] in {c.id for c in second}


def test_top_up_rounds_stop_at_the_bound_and_the_item_still_closes(settings, run_batch):
    manifest = """
name: topup-bound
model: tiny
defaults: {candidates: 2, steps: 1, size: 64x64}
selection: {winners: 1, min_accepted: 1, max_topup_rounds: 2}
items:
  - "a glass owl [[fault:validate:raise:*]]"
"""
    batch_id = run_batch(manifest)
    batch, items, cands = _rows(settings, batch_id)
    assert items[0].rounds == 2 and items[0].status == "done" and items[0].winners == []
    assert len(cands) == 2 + 2 + 2 and all(c.status == "failed" for c in cands)
    assert batch.status == "done"


def test_identical_images_in_one_batch_are_flagged_as_near_duplicates(settings, run_batch):
    manifest = """
name: twins
model: tiny
defaults: {candidates: 2, steps: 1, size: 64x64}
items:
  - {prompt: "a paper crane", seed: 77}
  - {prompt: "a paper crane", seed: 77}
"""
    batch_id = run_batch(manifest)
    _batch, items, cands = _rows(settings, batch_id)
    flagged = [c for c in cands if any(v["layer"] == "near_duplicate" for v in c.moderation)]
    assert len(flagged) >= 2, [(c.id, c.reasons) for c in cands]
    for c in flagged:
        twin_ids = next(v for v in c.moderation if v["layer"] == "near_duplicate")["details"]["of"]
        twins = [o for o in cands if o.id in twin_ids]
        assert twins and all(o.seed == c.seed and o.item_id != c.item_id for o in twins)
        assert c.status == "passed" and any("near_duplicate" in r for r in c.reasons), (
            "a flag, not a rejection"
        )


def test_a_manifest_switches_validator_and_scorer_by_name(settings, run_batch):
    base = """
name: scorer-{name}
model: tiny
defaults: {{candidates: 2, steps: 1, size: 64x64}}
validation: {{model: tiny-clip}}
scoring: {{model: {scorer}, weights: {{preference: 1.0, alignment: 0.0}}}}
items: ["a copper kettle"]
"""
    prefs = {}
    for scorer in ("tiny-aesthetic", "tiny-image-reward", "clip-score"):
        batch_id = run_batch(base.format(name=scorer, scorer=scorer))
        _batch, _items, cands = _rows(settings, batch_id)
        passed = [c for c in cands if c.status == "passed"]
        assert passed and all(c.preference is not None and c.score == round(c.preference, 6) for c in passed)
        prefs[scorer] = sorted(c.preference for c in passed)
    assert len({tuple(v) for v in prefs.values()}) == 3, prefs


def test_worker_logs_name_the_batch_item_and_candidates_of_each_stage(settings, stack, run_batch):
    batch_id = run_batch(BASIC.replace("name: e2e", "name: logged"))
    logs = "".join(p.log.read_text(errors="replace") for p in stack.procs if p.name.startswith("worker-"))
    for stage in ("generate", "moderate", "validate", "score"):
        assert f"{stage} done" in logs
    assert f"batch={batch_id}" in logs and f"item={batch_id}-00000" in logs and "candidates=[" in logs
    control = stack.proc("control").log.read_text(errors="replace")
    assert "item ranked" in control and f"item={batch_id}-00003" in control


def test_a_slice_whose_images_are_in_no_store_is_generated_again_from_its_seeds(
    settings, run_batch, wait_batch
):
    # As a slice generated on another host with FARM_QC=worker, whose QC worker never stored the images,
    # reaches this host's inline worker (a reaper re-send): the rows say 'generated' and name images that are
    # neither in the store nor handed off here.
    from farm import dispatch

    batch_id = run_batch(
        "name: regen\nmodel: tiny\ndefaults: {candidates: 2, steps: 2, size: 64x64}\nitems: [a moth]\n"
    )
    _, (item,), before = _rows(settings, batch_id)
    pixels = {c.id: np.asarray(Image.open(settings.artifacts_dir / c.image_path)) for c in before}
    paths = {c.id: c.image_path for c in before}
    with session_scope(settings.database_url) as s:
        batch = s.get(Batch, batch_id)
        batch.status, batch.items_done, batch.finished_at = "running", 0, None
        row = s.get(Item, item.id)
        row.status, row.winners, row.finished_at = "running", [], None
        for c in s.scalars(select(Candidate).where(Candidate.batch_id == batch_id)):
            c.status, c.image_path, c.rank, c.is_winner = (
                "generated",
                f"{batch_id}/elsewhere-{c.index}.png",
                None,
                False,
            )
    dispatch.send_item(batch_id, item.id, sorted(paths), settings=settings, priority=0)

    assert wait_batch(batch_id) == "done"
    _, (item,), after = _rows(settings, batch_id)
    for c in after:
        assert c.status in ("passed", "rejected"), (c.status, c.error)
        # A name of the lease generation that generated it again (each later stage task takes a generation of
        # its own after it); the first generation's file, named by no row, went with the batch's close.
        generation = int(c.image_path.rsplit(".g", 1)[1].removesuffix(".png"))
        assert 1 < generation < c.lease_token, (c.image_path, c.lease_token)
        assert c.image_path == image_name(batch_id, c.id, generation) != paths[c.id]
        assert not (settings.artifacts_dir / paths[c.id]).exists()
        assert (c.stage_attempts["generate"], c.stage_attempts["moderate"]) == (2, 1), (
            "generated again by the farm.generate moderate replaced itself with (a delivery that counts); "
            "moderate counted from the start with the new image"
        )
        again = np.asarray(Image.open(settings.artifacts_dir / c.image_path)).astype(int)
        diff = np.abs(again - pixels[c.id])
        # The same seed makes the same image, up to float rounding on another worker's thread count.
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert item.status == "done" and item.winners


BLOCKLIST = f"# exported from the hash service\n{'0' * 64},known-bad-image\n{'f' * 64}\treport 12\n"


def _blocklisted(pdq_blocklist: str) -> str:
    # pdq_max_distance 256 matches every image: what is pinned is that the worker read the list and used it.
    return f"""
name: blocklisted
model: tiny
defaults: {{candidates: 2, steps: 1, size: 64x64}}
moderation: {{pdq_blocklist: "{pdq_blocklist}", pdq_max_distance: 256}}
items: [a bowl of fruit]
"""


def _rejected_by_the_blocklist(settings, batch_id):
    _batch, items, cands = _rows(settings, batch_id)
    assert [c.status for c in cands] == ["rejected", "rejected"], [(c.status, c.error) for c in cands]
    assert all(c.reasons[0].startswith("pdq_blocklist: matches blocklist entry") for c in cands)
    assert items[0].status == "done" and items[0].winners == []


def test_a_blocklist_of_labelled_hashes_that_validates_rejects_at_moderate(settings, run_batch, tmp_path):
    """hash,label and hash<TAB>label lines pass validation and the worker reads them the same way (they used
    to fail every candidate at moderate)."""
    listing = tmp_path / "blocked.txt"
    listing.write_text(BLOCKLIST)
    _rejected_by_the_blocklist(settings, run_batch(_blocklisted(str(listing))))


def test_a_blocklist_uploaded_with_the_manifest_through_the_api_rejects_at_moderate(settings, wait_batch):
    """The file goes up with the manifest, into the artifact store; the workers read it from there."""
    import io

    from web import create_app

    client = create_app({"TESTING": True, "FARM_SETTINGS": settings}).test_client()
    r = client.post(
        "/api/v1/batches",
        data={
            "manifest": (io.BytesIO(_blocklisted("blocked.txt").encode()), "m.yaml"),
            "files": [(io.BytesIO(BLOCKLIST.encode()), "blocked.txt")],
        },
        content_type="multipart/form-data",
    )
    assert r.status_code == 202, r.json
    assert wait_batch(r.json["id"]) == "done"
    _rejected_by_the_blocklist(settings, r.json["id"])


def test_the_quality_example_ends_with_winners_for_every_item_and_shows_rejections(settings, run_batch):
    # batches/quality.yaml is the first look a new user has at quality control: on the tiny models it must
    # end with winners, and still reject some candidates at validation.
    batch_id = run_batch((BATCHES / "quality.yaml").read_text())
    batch, items, cands = _rows(settings, batch_id)
    assert batch.status == "done"
    assert all(it.winners for it in items), [(it.prompt, it.winners) for it in items]
    rejected = [c for c in cands if c.status == "rejected"]
    reasons = [r for c in rejected for r in c.reasons]
    assert any(r.startswith("validation:") for r in reasons), reasons
