"""The score stage: the preference score of each surviving candidate.

Idempotent: the scorer is deterministic and writes only onto 'validated' candidates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from farm.records import StagedCandidate, StageStart
from farm.tasks.moderate import load_images
from farm.tasks.stage import Stage

if TYPE_CHECKING:
    from farm.tasks.runtime import Runtime


def score_slice(rt: Runtime, start: StageStart, cands: list[StagedCandidate]) -> dict[str, dict[str, Any]]:
    scorer = rt.models.scorer(start.config.scoring.model)
    scores = scorer.score(load_images(rt, cands), start.item.prompt)
    return {c.id: {"preference": float(s)} for c, s in zip(cands, scores, strict=True)}


SCORE = Stage("score", score_slice)
