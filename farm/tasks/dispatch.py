"""farm.dispatch_batch: turn a written batch into chords, on the control queue."""

from __future__ import annotations

from farm import dispatch
from farm.celery_app import app
from farm.config import load_settings


@app.task(name="farm.dispatch_batch", ignore_result=True)
def dispatch_batch(batch_id: str) -> int:
    """Send one chord per item still pending. Idempotent: each item flips pending -> running before its chord
    is sent, so a redelivery sends only what was not sent."""
    return dispatch.dispatch_batch(batch_id, settings=load_settings())
