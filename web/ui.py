"""The HTML dashboard: batches, upload, one batch, one candidate, workers, and the pictures they show."""

from __future__ import annotations

import io
import json
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    send_file,
    session,
    url_for,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from farm.artifacts import ArtifactPathError, store_for
from farm.config import Settings
from farm.db import Batch, Candidate, Item, session_scope
from farm.manifest import ManifestError
from farm.states import BATCH_OPEN
from farm.views import progress
from web import intake, pictures, readers, security
from web.export import winners_zip

bp = Blueprint("ui", __name__)
bp.before_request(security.guard_ui)

CONTACT_SHEET_MAX = 240
ITEMS_PER_PAGE = 50


def _settings() -> Settings:
    return current_app.config["FARM_SETTINGS"]


def _get_batch(s: Session, batch_id: str) -> Batch:
    batch = s.get(Batch, batch_id)
    if batch is None:
        abort(404, description=f"There is no batch {batch_id!r}.")
    return batch


def _png(data: bytes) -> Response:
    response = Response(data, mimetype="image/png")
    response.headers["Cache-Control"] = "no-cache"
    return response


# -- login ---------------------------------------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response | str:
    target = request.values.get("next") or url_for("ui.batches")
    if not target.startswith("/") or target.startswith("//"):
        target = url_for("ui.batches")
    if not security.token_required():
        return redirect(target)
    error = None
    if request.method == "POST":
        if security.token_matches(request.form.get("token")):
            csrf = session.get(security.CSRF_FIELD)
            session.clear()
            session["authed"] = True
            if csrf:
                session[security.CSRF_FIELD] = csrf
            return redirect(target)
        error = "That is not the farm's token (FARM_WEB_TOKEN)."
    return render_template("login.html", error=error, next=target), 401 if error else 200


@bp.post("/logout")
def logout() -> Response:
    session.clear()
    return redirect(url_for("ui.login"))


# -- batches -------------------------------------------------------------------------------------------------


@bp.get("/")
def batches() -> str:
    with session_scope(_settings().database_url) as s:
        rows = readers.list_batches(s, limit=200)
    return render_template("batches.html", batches=rows)


@bp.get("/batches/<batch_id>")
def batch(batch_id: str) -> str:
    status = request.args.get("status") or None
    if status not in (None, *readers.CANDIDATE_FILTERS):
        abort(400, description=f"Unknown status filter {status!r}.")
    page_no = request.args.get("page", 1, type=int) or 1
    with session_scope(_settings().database_url) as s:
        b = _get_batch(s, batch_id)
        summary = readers.batch_summary(s, b)
        page = readers.item_page(s, batch_id, status=status, page=page_no, per_page=ITEMS_PER_PAGE)
        return render_template(
            "batch.html", batch=b, summary=summary, page=page, status=status,
            filters=readers.CANDIDATE_FILTERS, rejected_by=readers.rejected_by,
            active=b.status in BATCH_OPEN,
        )


@bp.post("/batches/<batch_id>/cancel")
def cancel(batch_id: str) -> Response:
    settings = _settings()
    with session_scope(settings.database_url) as s:
        status = _get_batch(s, batch_id).status
    if status not in BATCH_OPEN:
        flash(f"The batch is {status}; only a queued or running batch can be cancelled.", "error")
    else:
        try:
            changed = intake.cancel(batch_id, settings)
        except intake.BrokerUnavailable as exc:
            flash(str(exc), "error")
        else:
            if changed:
                flash("Batch cancelled. No new work starts; it closes once the slices in flight stop.", "ok")
            else:
                flash("The batch had already finished.", "error")
    return redirect(url_for("ui.batch", batch_id=batch_id))


def _batch_action(action: Any, batch_id: str) -> int | None:
    """Run a batch action: its count, or None after flashing why it was refused (404 for no such batch)."""
    try:
        return action(batch_id, _settings())
    except intake.NoSuchBatch:
        abort(404, description=f"There is no batch {batch_id!r}.")
    except (intake.ActionRefused, intake.BrokerUnavailable) as exc:
        flash(str(exc), "error")
    return None


@bp.post("/batches/<batch_id>/retry")
def retry(batch_id: str) -> Response:
    reset = _batch_action(intake.retry_failed, batch_id)
    if reset:
        flash(f"Retrying {reset} failed candidate{'' if reset == 1 else 's'}.", "ok")
    elif reset == 0:
        flash("The batch has no failed candidates.", "error")
    return redirect(url_for("ui.batch", batch_id=batch_id))


@bp.post("/batches/<batch_id>/resume")
def resume(batch_id: str) -> Response:
    sent = _batch_action(intake.resume, batch_id)
    if sent is not None:
        flash(f"Resumed: re-sent the unfinished work ({sent} message{'' if sent == 1 else 's'}).", "ok")
    return redirect(url_for("ui.batch", batch_id=batch_id))


@bp.get("/batches/<batch_id>/export.zip")
def export(batch_id: str) -> Response:
    settings = _settings()
    with session_scope(settings.database_url) as s:
        b = _get_batch(s, batch_id)
        archive = winners_zip(s, b, store_for(settings), names=settings.export_name)
        name = f"{b.name}-{b.id[:8]}-winners.zip"
    return send_file(archive, mimetype="application/zip", as_attachment=True, download_name=name)


@bp.get("/batches/<batch_id>/contact-sheet.png")
def contact_sheet(batch_id: str) -> Response:
    settings = _settings()
    with session_scope(settings.database_url) as s:
        b = _get_batch(s, batch_id)
        found = readers.winners(s, batch_id)
        tiles = [
            pictures.Tile(c.image_path, f"#{it.index}" + ("" if c.score is None else f" {c.score:.3f}"))
            for it, c in found[:CONTACT_SHEET_MAX]
        ]
        title = f"{b.name}: {len(found)} winners"
        if len(found) > CONTACT_SHEET_MAX:
            title += f" (first {CONTACT_SHEET_MAX} shown; export the zip for all)"
    return _png(pictures.contact_sheet(store_for(settings), tiles, title=title))


@bp.get("/batches/<batch_id>/scores.png")
def score_plot(batch_id: str) -> Response:
    with session_scope(_settings().database_url) as s:
        b = _get_batch(s, batch_id)
        spread = readers.scores(s, b)
    title = "composite score"
    if spread.unscored_rejected:
        title += f" ({spread.unscored_rejected} rejected before scoring not shown)"
    return _png(pictures.histogram(spread.passed, spread.rejected, title=title))


# -- upload --------------------------------------------------------------------------------------------------


@bp.route("/upload", methods=["GET", "POST"])
def upload() -> Response | tuple[str, int] | str:
    settings = _settings()
    context: dict[str, Any] = {
        "errors": [], "summary": None, "text": "", "limit": settings.max_upload_bytes,
        "asset_limit": settings.max_asset_bytes, "files": [],
    }
    if request.method == "GET":
        return render_template("upload.html", **context)
    data = intake.from_form(request, settings)
    if data is None:
        context["errors"] = [intake.Problem(None, "Choose a manifest file or paste the YAML.")]
        return render_template("upload.html", **context), 400
    context["text"] = data.decode("utf-8", errors="replace")
    try:
        uploads = intake.uploads_from(request, settings)
        context["files"] = sorted(uploads)
        if request.form.get("action") == "preview":
            context["summary"] = intake.preview(data, settings, uploads)
            return render_template("upload.html", **context)
        submitted = intake.submit(data, settings, uploads)
    except ManifestError as exc:
        context["errors"] = intake.problems(exc)
        return render_template("upload.html", **context), 400
    except intake.BrokerUnavailable as exc:
        context["errors"] = [intake.Problem(None, str(exc))]
        return render_template("upload.html", **context), 503
    flash(f"Submitted {submitted.items} items, {submitted.candidates} candidates.", "ok")
    return redirect(url_for("ui.batch", batch_id=submitted.batch_id))


# -- candidates, workers, artifacts --------------------------------------------------------------------------


@bp.get("/candidates/<candidate_id>")
def candidate(candidate_id: str) -> str:
    with session_scope(_settings().database_url) as s:
        c = s.get(Candidate, candidate_id)
        if c is None:
            abort(404, description=f"There is no candidate {candidate_id!r}.")
        item = s.get(Item, c.item_id)
        b = s.get(Batch, c.batch_id)
        siblings = s.scalars(
            select(Candidate.id).where(Candidate.item_id == c.item_id).order_by(Candidate.index)
        ).all()
        return render_template(
            "candidate.html", c=c, item=item, batch=b, siblings=siblings,
            recipe_json=json.dumps(c.recipe or {}, indent=2, sort_keys=True),
            rejected_by=readers.rejected_by(c), batch_progress=progress(s, b.id),
        )


@bp.get("/workers")
def workers() -> str:
    settings = _settings()
    with session_scope(settings.database_url) as s:
        rows = readers.worker_rows(s)
    flower = f"http://127.0.0.1:{settings.flower_port}"
    return render_template("workers.html", workers=rows, flower_url=flower)


@bp.get("/artifacts/<path:rel>")
def artifact(rel: str) -> Response:
    """A file from the artifact store, and nothing outside it."""
    store = store_for(_settings())
    try:
        path = store.local_path(rel)
        if path is not None:
            if not path.is_file():
                abort(404, description="No such artifact.")
            return send_file(path, max_age=3600)
        data = store.read_bytes(rel)
    except (ArtifactPathError, FileNotFoundError):
        abort(404, description="No such artifact.")
    kind = "image/png" if rel.endswith(".png") else "application/json" if rel.endswith(".json") else None
    return send_file(io.BytesIO(data), mimetype=kind or "application/octet-stream", max_age=3600)
