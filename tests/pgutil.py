"""Throw-away PostgreSQL databases for the suite's PostgreSQL mode and the postgres-marked tests.

The server is FARM_TEST_POSTGRES_URL (default: the CI machine's, trust auth). Where none answers, the tests
that need it skip with the reason, except in CI (CI=true), where a missing server is a failure.
"""

from __future__ import annotations

import os
import uuid

import pytest

ADMIN_URL = os.environ.get("FARM_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def enabled() -> bool:
    """The whole suite runs on PostgreSQL (`make test-postgres`)."""
    return os.environ.get("FARM_TEST_DATABASE") == "postgresql"


# CI runs the suite twice (`make test`, then `make test-postgres`). A test whose outcome cannot depend on the
# suite's database runs in one pass only, so the second pass does not pay for it again.
sqlite_pass_only = pytest.mark.skipif(
    enabled(), reason="does not depend on the suite's database: runs in the SQLite pass (make test) only"
)
postgres_pass_only = pytest.mark.skipif(
    not enabled(), reason="always uses PostgreSQL: runs in the PostgreSQL pass (make test-postgres) only"
)


def _connect():
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(ADMIN_URL)
    conn = psycopg2.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        dbname=url.database,
        connect_timeout=5,
    )
    conn.autocommit = True
    return conn


def available() -> str | None:
    """None when the server answers, else why not."""
    try:
        _connect().close()
        return None
    except Exception as exc:  # any failure to connect means: no server for these tests
        return f"no PostgreSQL at {ADMIN_URL}: {exc}".splitlines()[0]


def require() -> None:
    why = available()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have PostgreSQL: {why}")
        pytest.skip(why)


def create_database(prefix: str = "farm_t") -> str:
    """A new empty database; returns its SQLAlchemy URL."""
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = _connect()
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    from sqlalchemy.engine import make_url

    from farm.db import _engines

    for key, engine in list(_engines.items()):
        if key[1] == url:
            engine.dispose()
            _engines.pop(key, None)
    name = make_url(url).database
    conn = _connect()
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()
