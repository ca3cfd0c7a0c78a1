"""farm.score: the preference score of each surviving candidate."""

from __future__ import annotations

from typing import Any

from celery import Task

from farm.celery_app import app
from farm.records import StagedCandidate, StageStart
from farm.tasks.moderate import load_images
from farm.tasks.stage import STAGE_OPTIONS, run_stage


def score_slice(start: StageStart, cands: list[StagedCandidate]) -> dict[str, dict[str, Any]]:
    from farm.tasks.runtime import runtime

    rt = runtime()
    scorer = rt.scorer(start.batch.settings["scoring"]["model"])
    scores = scorer.score(load_images(cands), start.item.prompt)
    return {c.id: {"preference": float(s)} for c, s in zip(cands, scores, strict=True)}


@app.task(name="farm.score", **STAGE_OPTIONS)
def score(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Idempotent: the scorer is deterministic and writes only onto 'validated' candidates."""
    return run_stage(self, payload, "score", score_slice)
