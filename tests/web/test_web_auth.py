"""FARM_WEB_TOKEN: a login for the pages, a bearer token for the API; CSRF tokens on every HTML form."""

from __future__ import annotations

import pytest
from web_helpers import EXAMPLE_MANIFEST, csrf_from

from farm.db import Batch, session_scope

TOKEN = "correct horse battery staple"


@pytest.fixture
def locked(make_app, monkeypatch):
    monkeypatch.setenv("FARM_WEB_TOKEN", TOKEN)
    return make_app()


@pytest.fixture
def locked_client(locked):
    return locked.test_client()


def _login(client, token: str = TOKEN, next_url: str = "/"):
    page = client.get("/login").get_data(as_text=True)
    return client.post("/login", data={"csrf_token": csrf_from(page), "token": token, "next": next_url})


# -- API -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/api/v1/batches"),
        ("get", "/api/v1/batches/some-id"),
        ("post", "/api/v1/batches"),
        ("post", "/api/v1/batches/some-id/cancel"),
        ("get", "/api/v1/batches/some-id/export"),
        ("get", "/api/v1/workers"),
        ("get", "/api/v1/schema"),
        ("get", "/api/v1/openapi.json"),
    ],
)
def test_api_without_bearer_is_401(locked_client, method, url):
    r = getattr(locked_client, method)(url)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Bearer" in r.json["errors"][0]["message"]


def test_api_with_wrong_bearer_is_401(locked_client):
    for header in (f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", TOKEN):
        assert locked_client.get("/api/v1/batches", headers={"Authorization": header}).status_code == 401


def test_api_with_bearer_works(locked_client, make_batch):
    made = make_batch("done")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert locked_client.get("/api/v1/batches", headers=auth).json["total"] == 1
    assert locked_client.get(f"/api/v1/batches/{made.batch_id}", headers=auth).status_code == 200
    r = locked_client.post("/api/v1/batches?dry_run=1", data=EXAMPLE_MANIFEST, content_type="text/yaml",
                           headers=auth)
    assert r.status_code == 200  # bearer requests need no CSRF token


def test_api_submit_with_bearer_and_no_csrf(locked_client, broker):
    r = locked_client.post("/api/v1/batches", data=EXAMPLE_MANIFEST, content_type="text/yaml",
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 202


def test_logged_in_browser_may_read_but_not_write_the_api(locked_client, make_batch):
    made = make_batch("running")
    _login(locked_client)
    assert locked_client.get("/api/v1/batches").status_code == 200  # the batches page polls this
    assert locked_client.post(f"/api/v1/batches/{made.batch_id}/cancel").status_code == 401


# -- pages ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/", "/upload", "/workers", "/batches/x", "/candidates/x",
                                 "/artifacts/a.png", "/batches/x/contact-sheet.png", "/batches/x/export.zip"])
def test_pages_redirect_to_login(locked_client, url):
    r = locked_client.get(url)
    assert r.status_code == 302
    assert r.headers["Location"].startswith("/login?next=")


def test_login_with_the_token_then_pages_work(locked_client, make_batch):
    made = make_batch("done")
    r = _login(locked_client, next_url=f"/batches/{made.batch_id}")
    assert r.status_code == 302 and r.headers["Location"] == f"/batches/{made.batch_id}"
    assert locked_client.get("/").status_code == 200
    assert locked_client.get(f"/artifacts/{made.batch_id}/{made.item_ids[0]}-000.png").status_code == 200
    assert "Log out" in locked_client.get("/workers").get_data(as_text=True)


def test_login_with_a_wrong_token_is_refused(locked_client):
    r = _login(locked_client, token="nope")
    assert r.status_code == 401
    assert "not the farm&#39;s token" in r.get_data(as_text=True)
    assert locked_client.get("/").status_code == 302


def test_login_does_not_redirect_off_site(locked_client):
    r = _login(locked_client, next_url="//evil.example/")
    assert r.headers["Location"] == "/"


def test_logout_ends_the_session(locked_client):
    _login(locked_client)
    token = csrf_from(locked_client.get("/").get_data(as_text=True))
    assert locked_client.post("/logout", data={"csrf_token": token}).status_code == 302
    assert locked_client.get("/").status_code == 302


def test_login_page_without_a_token_configured_just_redirects(client):
    assert client.get("/login").status_code == 302


def test_secret_key_is_derived_from_the_token_or_taken_from_farm_web_secret(make_app, monkeypatch):
    monkeypatch.setenv("FARM_WEB_TOKEN", TOKEN)
    first, second = make_app(), make_app()
    assert first.secret_key == second.secret_key and TOKEN not in first.secret_key
    monkeypatch.setenv("FARM_WEB_SECRET", "explicit-secret")
    assert make_app().secret_key == "explicit-secret"


def test_a_session_from_another_secret_is_not_logged_in(make_app, monkeypatch):
    monkeypatch.setenv("FARM_WEB_TOKEN", TOKEN)
    client = make_app().test_client()
    _login(client)
    monkeypatch.setenv("FARM_WEB_TOKEN", "another token")
    other = make_app()
    cookie = client.get_cookie("session")
    fresh = other.test_client()
    fresh.set_cookie("session", cookie.value)
    assert fresh.get("/").status_code == 302


# -- CSRF ----------------------------------------------------------------------------------------------------


def test_upload_without_csrf_is_400_and_queues_nothing(client, settings):
    r = client.post("/upload", data={"manifest_text": EXAMPLE_MANIFEST, "action": "submit"})
    assert r.status_code == 400
    assert "CSRF token" in r.get_data(as_text=True)
    client.get("/upload")  # a session with a token exists now; a wrong one is refused too
    r = client.post("/upload", data={"csrf_token": "forged", "manifest_text": EXAMPLE_MANIFEST,
                                     "action": "submit"})
    assert r.status_code == 400


def test_cancel_without_csrf_is_400_and_changes_nothing(client, settings, make_batch):
    made = make_batch("running")
    assert client.post(f"/batches/{made.batch_id}/cancel").status_code == 400
    with session_scope(settings.database_url) as s:
        assert s.get(Batch, made.batch_id).status == "running"


def test_login_without_csrf_is_400(locked_client):
    assert locked_client.post("/login", data={"token": TOKEN}).status_code == 400
    assert locked_client.get("/").status_code == 302


def test_csrf_token_from_another_session_is_refused(make_app, make_batch):
    app = make_app()
    made = make_batch("running")
    alice, mallory = app.test_client(), app.test_client()
    stolen = csrf_from(mallory.get("/upload").get_data(as_text=True))
    alice.get("/upload")
    assert alice.post(f"/batches/{made.batch_id}/cancel", data={"csrf_token": stolen}).status_code == 400
