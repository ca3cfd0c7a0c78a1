"""The validate stage: prompt alignment and required attributes with a CLIP-type model.

Idempotent: scores are recomputed from the image, written only onto 'moderated' candidates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from farm.records import StagedCandidate, StageStart
from farm.states import CandidateStatus, CandidateVerdict
from farm.tasks.moderate import load_images
from farm.tasks.stage import Stage

if TYPE_CHECKING:
    from farm.tasks.runtime import Runtime


def validate_slice(rt: Runtime, start: StageStart, cands: list[StagedCandidate]) -> dict[str, dict[str, Any]]:
    cfg = start.config.validation
    item = start.item
    images = load_images(rt, cands)
    model = rt.models.validator(cfg.model)
    scores = model.alignment(images, item.prompt)
    phrases = item.params.get("required_attributes") or []
    margins = model.attributes(images, phrases) if phrases else [{} for _ in cands]
    floor, need = cfg.min_alignment, cfg.attribute_threshold
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
            record.update(
                status=CandidateStatus.REJECTED,
                verdict=CandidateVerdict.REJECTED,
                reasons=[*(c.reasons or []), *problems],
            )
        out[c.id] = record
    return out


#: Its results are written with score's: one transaction less per slice, and a crash in score repeats only
#: validate's one batched CLIP pass.
VALIDATE = Stage("validate", validate_slice, hold=True)
