"""Who may use the web app: a shared token (FARM_WEB_TOKEN) and per-session CSRF tokens on HTML forms.

- No token configured: everything is open (the single-machine default on 127.0.0.1).
- Token configured: HTML pages need a login (the token, typed once, kept in the session cookie); the API
  needs ``Authorization: Bearer <token>``. A logged-in browser may also *read* the API (the batches page
  polls it); API writes always need the bearer token.
- Every HTML form POST carries the session's CSRF token in a hidden field; a missing or wrong one is a 400.
  The API is exempt: a bearer token is not sent by a browser on its own, so it cannot be forged cross-site.
"""

from __future__ import annotations

import hmac
import secrets

from flask import Flask, Response, abort, current_app, jsonify, redirect, request, session, url_for

from farm.config import Settings

CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# UI endpoints reachable without a login.
PUBLIC_ENDPOINTS = frozenset({"ui.login", "static"})


def settings() -> Settings:
    return current_app.config["FARM_SETTINGS"]


def token_required() -> bool:
    return bool(settings().web_token)


def token_matches(given: str | None) -> bool:
    expected = settings().web_token or ""
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def logged_in() -> bool:
    return not token_required() or session.get("authed") is True


def csrf_token() -> str:
    """This session's CSRF token, created on first use."""
    token = session.get(CSRF_FIELD)
    if not token:
        token = session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return token


def check_csrf() -> None:
    given = request.form.get(CSRF_FIELD) or request.headers.get("X-CSRF-Token") or ""
    expected = session.get(CSRF_FIELD) or ""
    if not (given and expected and hmac.compare_digest(given.encode(), expected.encode())):
        abort(
            400, description="The form's CSRF token is missing or out of date; reload the page and try again."
        )


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def guard_ui() -> Response | None:
    if request.endpoint in PUBLIC_ENDPOINTS:
        if request.method not in SAFE_METHODS:
            check_csrf()
        return None
    if not logged_in():
        return redirect(url_for("ui.login", next=request.full_path.rstrip("?")))
    if request.method not in SAFE_METHODS:
        check_csrf()
    return None


def guard_api() -> Response | None:
    if not token_required():
        return None
    if token_matches(bearer_token()):
        return None
    if request.method in SAFE_METHODS and session.get("authed") is True:
        return None
    response = jsonify(errors=[{"path": None, "message": "send 'Authorization: Bearer <FARM_WEB_TOKEN>'"}])
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Bearer realm="farm"'
    return response


def init_app(app: Flask) -> None:
    app.jinja_env.globals["csrf_token"] = csrf_token
    app.jinja_env.globals["csrf_field"] = CSRF_FIELD
    app.jinja_env.globals["auth_enabled"] = token_required
