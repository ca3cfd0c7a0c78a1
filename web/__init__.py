"""The farm's dashboard (HTML) and JSON API, served by one Flask app built by :func:`create_app`.

Everything here reads SQL through farm/ and renders it; nothing talks to the Celery result backend. The app
holds no state at import time: settings are read when the app is created.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from typing import Any

from flask import Flask, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from farm.config import Settings, load_settings
from farm.db import migrate

# Room for the multipart envelope around a manifest of exactly FARM_MAX_UPLOAD_BYTES; the manifest itself is
# checked against the exact limit in the views.
FORM_OVERHEAD_BYTES = 64 * 1024


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app: settings from FARM_* variables, schema migrated, blueprints registered.

    ``test_config`` overrides Flask config keys after the settings are read; it may carry ``FARM_SETTINGS``
    (a :class:`farm.config.Settings`) to use instead of the environment.
    """
    from web.intake import upload_limit

    app = Flask(__name__)
    config = dict(test_config or {})
    settings: Settings = config.pop("FARM_SETTINGS", None) or load_settings()
    app.config.update(
        FARM_SETTINGS=settings,
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
        MAX_FORM_MEMORY_SIZE=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
        # What a multipart submission may send with its files (``_room_for_uploaded_files``).
        FARM_MAX_UPLOAD_REQUEST_BYTES=upload_limit(settings) + FORM_OVERHEAD_BYTES,
        SECRET_KEY=_secret_key(settings),
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )
    app.config.update(config)
    app.json.sort_keys = False  # keep the hand-written order of the OpenAPI document
    migrate(settings.database_url)

    from web import api, filters, ops, security, ui

    security.init_app(app)
    filters.init_app(app)
    app.register_blueprint(ui.bp)
    app.register_blueprint(api.bp, url_prefix="/api/v1")
    app.register_blueprint(ops.bp)
    app.register_error_handler(HTTPException, _http_error)
    app.before_request(_room_for_uploaded_files)
    return app


#: Endpoints that take files beside the manifest (multipart field ``files``).
UPLOAD_ENDPOINTS = frozenset({"api.create_batch", "ui.upload"})


def _room_for_uploaded_files() -> None:
    """Let a multipart submission carry its files (FARM_MAX_ASSET_BYTES each) as well as the manifest.

    An app-level hook, so it runs before the blueprints' guards, which read the form (CSRF). Every other
    request keeps the manifest's limit; the manifest and each file are measured against their own limits
    after.
    """
    if request.endpoint in UPLOAD_ENDPOINTS and (request.mimetype or "").startswith("multipart/"):
        request.max_content_length = current_app.config["FARM_MAX_UPLOAD_REQUEST_BYTES"]


def _secret_key(settings: Settings) -> str:
    """FARM_WEB_SECRET, else one derived from the token (stable across restarts), else random per process."""
    explicit = os.environ.get("FARM_WEB_SECRET")
    if explicit:
        return explicit
    if settings.web_token:
        return hashlib.sha256(f"farm-web-session\0{settings.web_token}".encode()).hexdigest()
    return secrets.token_hex(32)


def _http_error(exc: HTTPException) -> tuple[Response | str, int]:
    code = exc.code or 500
    if isinstance(exc, RequestEntityTooLarge) and exc.description == RequestEntityTooLarge.description:
        # Refused by werkzeug before any view ran: say which limit, not only that there is one.
        settings = current_app.config["FARM_SETTINGS"]
        manifest_limit = (
            f"The upload is larger than the limit of {settings.max_upload_bytes} bytes for a manifest "
            "(FARM_MAX_UPLOAD_BYTES)"
        )
        if request.max_content_length != current_app.config["MAX_CONTENT_LENGTH"]:
            description = (
                f"{manifest_limit} plus {settings.max_asset_bytes} bytes for each file sent with it "
                "(FARM_MAX_ASSET_BYTES)."
            )
        else:
            description = f"{manifest_limit}. Split the batch or raise the limit."
        exc = RequestEntityTooLarge(description=description)
    if request.path.startswith("/api/"):
        response = jsonify(errors=[{"path": None, "message": exc.description}])
        return response, code
    return render_template("error.html", code=code, name=exc.name, message=exc.description), code
