"""farm.dispatch_batch: turn a written batch into chords, on the control queue."""

from __future__ import annotations

from farm import dispatch
from farm.canvas import DISPATCH_BATCH_TASK
from farm.celery_app import app
from farm.config import load_settings
from farm.db import TRANSIENT_DB_ERRORS


@app.task(
    name=DISPATCH_BATCH_TASK,
    ignore_result=True,
    autoretry_for=TRANSIENT_DB_ERRORS,
    retry_backoff=True,
    retry_backoff_max=30,
    max_retries=8,
)
def dispatch_batch(batch_id: str) -> int:
    """Send one chord per item still pending. Idempotent: each item flips pending -> running before its chord
    is sent, so a redelivery or a retry (a database blip between two items) sends only what was not sent; a
    dispatch that fails for good part way is sent again by the reaper."""
    return dispatch.dispatch_batch(batch_id, settings=load_settings())
