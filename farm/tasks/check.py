"""farm.check: moderate, validate and score a slice in turn, on the device that generated it."""

from __future__ import annotations

from typing import Any

from celery import Task

from farm.celery_app import app
from farm.tasks.moderate import MODERATE
from farm.tasks.score import SCORE
from farm.tasks.stage import STAGE_OPTIONS, run_stages
from farm.tasks.validate import VALIDATE

CHECKS = (MODERATE, VALIDATE, SCORE)


@app.task(name="farm.check", **STAGE_OPTIONS)
def check(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Idempotent: each stage works only on candidates still at its input status and writes with a guard
    on it, so a redelivery redoes only what had not been recorded; the payload it returns (the chord's
    header result) is its input, the same on every delivery."""
    return run_stages(self, payload, CHECKS)
