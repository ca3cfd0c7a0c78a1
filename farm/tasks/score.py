"""The score stage: the preference score of each surviving candidate.

Idempotent: the scorer is deterministic and writes only onto 'validated' candidates.
"""

from __future__ import annotations

from typing import Any

from farm.records import StagedCandidate, StageStart
from farm.tasks.moderate import load_images
from farm.tasks.stage import Stage


def score_slice(start: StageStart, cands: list[StagedCandidate]) -> dict[str, dict[str, Any]]:
    from farm.tasks.runtime import runtime

    rt = runtime()
    scorer = rt.scorer(start.config.scoring.model)
    scores = scorer.score(load_images(cands), start.item.prompt)
    return {c.id: {"preference": float(s)} for c, s in zip(cands, scores, strict=True)}


SCORE = Stage("score", score_slice)
