"""The JSON API under /api/v1: submit, list, inspect, cancel, retry, resume and export batches; workers; the
schemas.

Errors are JSON too: ``{"errors": [{"path": ..., "message": ...}]}``, where ``path`` names the manifest field
(``items[3].size``) for manifest problems and is null otherwise.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, abort, current_app, jsonify, request, send_file

from farm.artifacts import store_for
from farm.config import Settings
from farm.db import Batch, session_scope
from farm.manifest import ManifestError, json_schema
from farm.states import BATCH_OPEN
from farm.views import batch_dict
from web import intake, readers, security
from web.export import winners_zip
from web.openapi import openapi_document

bp = Blueprint("api", __name__)
bp.before_request(security.guard_api)


def _settings() -> Settings:
    return current_app.config["FARM_SETTINGS"]


def _errors(status: int, problems: list[dict[str, Any]]) -> tuple[Response, int]:
    return jsonify(errors=problems), status


def _get_batch(s: Any, batch_id: str) -> Batch:
    batch = s.get(Batch, batch_id)
    if batch is None:
        abort(404, description=f"no batch {batch_id!r}")
    return batch


@bp.post("/batches")
def create_batch() -> tuple[Response, int]:
    settings = _settings()
    data = intake.from_api_request(request, settings)
    if data is None:
        return _errors(400, [{"path": None, "message": "send the manifest as a text/yaml body or as the "
                                                          "multipart field 'manifest' (with the files it "
                                                          "names in the multipart field 'files')"}])
    dry = request.args.get("dry_run", "").lower() in ("1", "true", "yes")
    try:
        uploads = intake.uploads_from(request, settings)
        if dry:
            return jsonify(dry_run=True, summary=intake.preview(data, settings, uploads)), 200
        submitted = intake.submit(data, settings, uploads)
    except ManifestError as exc:
        return _errors(400, [p.as_dict() for p in intake.problems(exc)])
    except intake.BrokerUnavailable as exc:
        return _errors(503, [{"path": None, "message": str(exc)}])
    body = {"id": submitted.batch_id, "items": submitted.items, "candidates": submitted.candidates}
    response = jsonify(body)
    response.headers["Location"] = f"/api/v1/batches/{submitted.batch_id}"
    return response, 202


@bp.get("/batches")
def list_batches() -> Response:
    limit = min(max(request.args.get("limit", 100, type=int) or 100, 1), 1000)
    offset = max(request.args.get("offset", 0, type=int) or 0, 0)
    status = request.args.get("status") or None
    with session_scope(_settings().database_url) as s:
        rows = readers.list_batches(s, limit=limit, offset=offset, status=status)
        total = readers.count_batches(s, status=status)
    return jsonify(batches=rows, total=total, limit=limit, offset=offset)


@bp.get("/batches/<batch_id>")
def get_batch(batch_id: str) -> Response:
    with session_scope(_settings().database_url) as s:
        batch = _get_batch(s, batch_id)
        out = batch_dict(s, batch, with_items=request.args.get("items", "1") != "0")
        p = out["progress"]
        out.update(readers.rates(batch, p["done"], p["total"]))
    return jsonify(out)


@bp.post("/batches/<batch_id>/cancel")
def cancel_batch(batch_id: str) -> tuple[Response, int]:
    settings = _settings()
    with session_scope(settings.database_url) as s:
        status = _get_batch(s, batch_id).status
    if status not in BATCH_OPEN:
        return _errors(409, [{"path": None, "message": f"batch {batch_id} is {status}; only a queued or "
                                                         "running batch can be cancelled"}])
    try:
        changed = intake.cancel(batch_id, settings)
    except intake.BrokerUnavailable as exc:
        return _errors(503, [{"path": None, "message": str(exc)}])
    return jsonify(id=batch_id, cancelled=changed), 202 if changed else 409


def _batch_action(action: Any, batch_id: str) -> int | tuple[Response, int]:
    """Run a batch action: its count, or the JSON error its refusal maps to (404, 409, 503)."""
    try:
        return action(batch_id, _settings())
    except intake.NoSuchBatch:
        abort(404, description=f"no batch {batch_id!r}")
    except intake.ActionRefused as exc:
        return _errors(409, [{"path": None, "message": str(exc)}])
    except intake.BrokerUnavailable as exc:
        return _errors(503, [{"path": None, "message": str(exc)}])


@bp.post("/batches/<batch_id>/retry")
def retry_batch(batch_id: str) -> tuple[Response, int]:
    """Send a done batch's failed candidates through the pipeline again."""
    reset = _batch_action(intake.retry_failed, batch_id)
    if isinstance(reset, tuple):
        return reset
    return jsonify(id=batch_id, retried=reset), 202 if reset else 200


@bp.post("/batches/<batch_id>/resume")
def resume_batch(batch_id: str) -> tuple[Response, int]:
    """Re-send the work of a queued or running batch whose messages were lost."""
    sent = _batch_action(intake.resume, batch_id)
    if isinstance(sent, tuple):
        return sent
    return jsonify(id=batch_id, messages=sent), 202


@bp.get("/batches/<batch_id>/export")
def export_batch(batch_id: str) -> Response:
    settings = _settings()
    with session_scope(settings.database_url) as s:
        batch = _get_batch(s, batch_id)
        archive = winners_zip(s, batch, store_for(settings), names=settings.export_name)
        name = f"{batch.name}-{batch.id[:8]}-winners.zip"
    return send_file(archive, mimetype="application/zip", as_attachment=True, download_name=name)


@bp.get("/workers")
def list_workers() -> Response:
    with session_scope(_settings().database_url) as s:
        return jsonify(workers=readers.worker_rows(s))


@bp.get("/schema")
def manifest_schema() -> Response:
    response = jsonify(json_schema())
    response.mimetype = "application/schema+json"
    return response


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document())
