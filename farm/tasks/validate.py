"""farm.validate: prompt alignment and required attributes with a CLIP-type model."""

from __future__ import annotations

from typing import Any

from celery import Task

from farm.celery_app import app
from farm.records import StagedCandidate, StageStart
from farm.tasks.moderate import load_images
from farm.tasks.stage import MIDDLE_STAGE_OPTIONS, run_stage


def validate_slice(start: StageStart, cands: list[StagedCandidate]) -> dict[str, dict[str, Any]]:
    from farm.tasks.runtime import runtime

    rt = runtime()
    cfg = start.batch.settings["validation"]
    item = start.item
    images = load_images(cands)
    model = rt.validator(cfg["model"])
    scores = model.alignment(images, item.prompt)
    phrases = item.params.get("required_attributes") or []
    margins = model.attributes(images, phrases) if phrases else [{} for _ in cands]
    floor, need = cfg.get("min_alignment"), cfg.get("attribute_threshold", 0.0)
    out = {}
    for c, score, margin in zip(cands, scores, margins, strict=True):
        problems = []
        if floor is not None and score < floor:
            problems.append(f"validation: alignment {score:.3f} < min_alignment {floor:.3f}")
        problems += [
            f"validation: attribute '{p}' margin {m:.3f} < {need:.3f}" for p, m in margin.items() if m < need
        ]
        record: dict[str, Any] = {
            "alignment": float(score),
            "attributes": {**(c.attributes or {}), "required": margin},
        }
        if problems:
            record.update(status="rejected", verdict="rejected", reasons=[*(c.reasons or []), *problems])
        out[c.id] = record
    return out


@app.task(name="farm.validate", **MIDDLE_STAGE_OPTIONS)
def validate(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Idempotent: scores are recomputed from the stored image, written only onto 'moderated' candidates."""
    return run_stage(self, payload, "validate", validate_slice)
