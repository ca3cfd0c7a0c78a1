"""farm.reap: lost work found and finished (farm.reaper), on the control queue: on beat every
FARM_REAPER_INTERVAL seconds, and once when the control worker starts."""

from __future__ import annotations

from farm.canvas import REAP_TASK
from farm.celery_app import app
from farm.config import load_settings


@app.task(name=REAP_TASK, ignore_result=True)
def reap() -> dict:
    """Re-send or close stalled work (see farm.reaper). Idempotent: acts only on items idle past the stall
    limit, and every action it takes is itself idempotent."""
    from farm.reaper import reap as reap_stalled

    report = reap_stalled(app, load_settings())
    return {
        "reranked": report.reranked,
        "resent": report.resent,
        "closed": report.closed,
        "redispatched": report.redispatched,
        "leases": report.leases,
        "skipped_busy": report.skipped_busy,
    }
