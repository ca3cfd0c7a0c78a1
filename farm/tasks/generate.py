"""The generate stage: one batched forward pass for a slice, its PNGs written in threads and waited for
before its row names them (or, with FARM_QC=worker, handed off to the device's QC worker, which writes
them). A slice whose batch is cancelled while it generates stops at its next denoising step and records its
candidates as cancelled (farm.tasks.interrupt)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from farm import logs, records
from farm.artifacts import image_name
from farm.records import StagedCandidate, StageStart
from farm.states import CandidateStatus, CandidateVerdict
from farm.tasks.interrupt import SliceCancelled, watch_slice
from farm.tasks.stage import Stage

if TYPE_CHECKING:
    from farm.tasks.runtime import Runtime

log = logging.getLogger(__name__)


def generate_slice(rt: Runtime, start: StageStart, cands: list[StagedCandidate]) -> dict[str, dict[str, Any]]:
    from farm.ml.moderation import check_prompt_terms

    batch, item = start.batch, start.item
    cfg = start.config
    terms = check_prompt_terms(
        item.prompt, terms=cfg.moderation.blocked_terms, patterns=cfg.moderation.blocked_patterns
    )
    if terms.verdict == "reject":
        record = {
            "status": CandidateStatus.REJECTED,
            "verdict": CandidateVerdict.REJECTED,
            "reasons": [f"{terms.layer}: {terms.reason}"],
            "moderation": [asdict(terms)],
        }
        return {c.id: dict(record) for c in cands}
    p = item.params
    gen = rt.models.generator(batch.model, dtype=cfg.dtype, memory=cfg.memory.model_dump())
    try:
        images = gen.generate(
            prompt=item.prompt,
            negative_prompt=item.negative_prompt,
            seeds=[c.seed for c in cands],
            steps=p["steps"],
            guidance=p["guidance"],
            width=p["width"],
            height=p["height"],
            scheduler=p["scheduler"],
            on_step=watch_slice(rt, batch.id),
        )
    except SliceCancelled as stop:  # the batch was cancelled mid-slice: no image, the chain goes on to close
        logs.event(log, "generate stopped: batch cancelled", batch=batch.id, step=stop.step, steps=stop.steps)
        return {c.id: records.cancelled("generate") for c in cands}
    base = gen.recipe()
    # The pass may have outlasted the lease: no file for what another holder has.
    kept = None if rt.lease is None else {c.id for c in rt.lease.keep(cands)}
    out, files, stored = {}, [], []
    for position, (c, image) in enumerate(zip(cands, images, strict=True)):
        if kept is not None and c.id not in kept:
            continue
        rel = image_name(batch.id, c.id, start.token)
        recipe = {
            **base,
            "batch": batch.id,
            "candidate": c.id,
            "prompt": item.prompt,
            "negative_prompt": item.negative_prompt,
            "seed": c.seed,
            "slice_position": position,  # in base["slice_seeds"]: replay regenerates the whole slice
            "steps": p["steps"],
            "guidance": p["guidance"],
            "width": p["width"],
            "height": p["height"],
            "scheduler": p["scheduler"] or base.get("scheduler"),
        }
        files.append((rel, image, recipe))
        stored.append(c)
        out[c.id] = {"image_path": rel, "recipe": recipe, "device": rt.queue, "worker": rt.name}
    if rt.images.handing_off:  # FARM_QC=worker: the device's QC worker stores the PNGs
        for rel, image, _recipe in files:
            rt.images.handoff.put(rel, image)
        return out
    for rel, image, _recipe in files:
        rt.images.remember(rel, image.convert("RGB"))
    for c, future in zip(stored, rt.images.store.start_pngs(files), strict=True):
        rt.images.pending_writes[c.id] = future
    return out


def settle_writes(rt: Runtime, cands: list[StagedCandidate]) -> dict[str, dict[str, Any]]:
    """Wait for the slice's PNG writes; a candidate whose image could not be stored fails (its row is
    written only now, so it never names a missing file)."""
    pending = rt.images.pending_writes
    failed = {}
    for c in cands:
        future = pending.pop(c.id, None)
        error = future.exception() if future is not None else None
        if error is not None:
            failed[c.id] = records.image_failure(
                "generate", f"could not store the image: {type(error).__name__}: {error}"
            )
    return failed


GENERATE = Stage("generate", generate_slice, settle=settle_writes)
