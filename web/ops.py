"""Endpoints for the machines around the farm, not for people: ``/healthz`` for a readiness probe and
``/metrics`` for Prometheus. Neither needs the token (they say nothing about prompts or images), both are
cheap, and both read at request time: nothing is cached between scrapes.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text

from farm.config import Settings
from farm.db import get_engine
from web import metrics

bp = Blueprint("ops", __name__)

# The plain text format every Prometheus server and agent reads (the newest client would announce 1.0.0).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _settings() -> Settings:
    return current_app.config["FARM_SETTINGS"]


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """Ready when the database answers ``SELECT 1``; 503 with the error otherwise."""
    try:
        with get_engine(_settings().database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means the same to a probe: not ready
        current_app.logger.warning("healthz: database check failed: %s", exc)
        return jsonify(ok=False, database="error", error=f"{type(exc).__name__}: {exc}"[:500]), 503
    return jsonify(ok=True, database="ok"), 200


@bp.get("/metrics")
def prometheus() -> Response:
    body = metrics.render(_settings())
    response = Response(body, mimetype="text/plain")
    response.headers["Content-Type"] = METRICS_CONTENT_TYPE
    response.headers["Cache-Control"] = "no-store"
    return response
