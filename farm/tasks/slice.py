"""farm.slice: a slice generated, moderated, validated and scored in turn on the device that took it."""

from __future__ import annotations

from typing import Any

from celery import Task

from farm.celery_app import app
from farm.tasks.generate import GENERATE
from farm.tasks.moderate import MODERATE
from farm.tasks.score import SCORE
from farm.tasks.stage import STAGE_OPTIONS, run_stages
from farm.tasks.validate import VALIDATE

STAGES = (GENERATE, MODERATE, VALIDATE, SCORE)


@app.task(name="farm.slice", **STAGE_OPTIONS)
def run_slice(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Idempotent: candidate ids and seeds are fixed in SQL; each stage works only on candidates still at its
    input status and writes with a guard on it, and each PNG is written to a temporary name and renamed, so
    a redelivery redoes only what had not been recorded. The payload it returns (the chord's header result)
    is its input, the same on every delivery."""
    return run_stages(self, payload, STAGES)
