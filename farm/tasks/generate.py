"""farm.generate: one batched forward pass for a slice, images written to the artifact store."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from celery import Task

from farm.celery_app import app
from farm.records import StagedCandidate, StageStart
from farm.tasks.stage import FIRST_STAGE_OPTIONS, Stage, pin_rest_of_chain, run_stages


def generate_slice(start: StageStart, cands: list[StagedCandidate]) -> dict[str, dict[str, Any]]:
    from farm.ml.moderation import check_prompt_terms
    from farm.tasks.runtime import runtime

    rt = runtime()
    batch, item = start.batch, start.item
    cfg = batch.settings
    terms = check_prompt_terms(
        item.prompt, terms=cfg["moderation"]["blocked_terms"], patterns=cfg["moderation"]["blocked_patterns"]
    )
    if terms.verdict == "reject":
        record = {
            "status": "rejected",
            "verdict": "rejected",
            "reasons": [f"{terms.layer}: {terms.reason}"],
            "moderation": [asdict(terms)],
        }
        return {c.id: dict(record) for c in cands}
    p = item.params
    gen = rt.generator(batch.model, dtype=cfg["dtype"], memory=cfg["memory"])
    images = gen.generate(
        prompt=item.prompt,
        negative_prompt=item.negative_prompt,
        seeds=[c.seed for c in cands],
        steps=p["steps"],
        guidance=p["guidance"],
        width=p["width"],
        height=p["height"],
        scheduler=p["scheduler"],
    )
    base = gen.recipe()
    out, files = {}, []
    for c, image in zip(cands, images, strict=True):
        rel = f"{batch.id}/{c.id}.png"
        recipe = {
            **base,
            "batch": batch.id,
            "candidate": c.id,
            "prompt": item.prompt,
            "negative_prompt": item.negative_prompt,
            "seed": c.seed,
            "steps": p["steps"],
            "guidance": p["guidance"],
            "width": p["width"],
            "height": p["height"],
            "scheduler": p["scheduler"] or base.get("scheduler"),
        }
        files.append((rel, image, recipe))
        out[c.id] = {"image_path": rel, "recipe": recipe, "device": rt.queue, "worker": rt.name}
    rt.store.save_pngs(files)
    for rel, image, _recipe in files:
        rt.remember_image(rel, image.convert("RGB"))
    return out


GENERATE = Stage("generate", generate_slice)


@app.task(name="farm.generate", **FIRST_STAGE_OPTIONS)
def generate(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Idempotent: candidate ids and seeds are fixed in SQL, each PNG is written to a temporary name and
    renamed, and only candidates still pending are generated, so a redelivery rewrites nothing done."""
    from farm.tasks.runtime import runtime

    run_stages(self, payload, [GENERATE])
    pin_rest_of_chain(self, runtime().queue)
    return payload
