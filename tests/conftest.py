"""Shared fixtures: a session FARM_HOME, the embedded Redis, real worker subprocesses, a temporary database.

The environment is set before anything imports farm.celery_app, because the Celery app reads its broker from
the environment when it is created. Two CPU-backed device queues (cuda0=cpu,cuda1=cpu) run the same code a
two-GPU host runs. Nothing here mocks Redis, Celery or SQL.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SESSION_HOME = Path(tempfile.mkdtemp(prefix="farm-test-"))
os.environ.update(
    {
        "FARM_HOME": str(SESSION_HOME),
        "FARM_DEVICES": "cuda0=cpu,cuda1=cpu",
        "FARM_FAULTS": "1",
        "FARM_SLICE_SIZE": "2",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }
)
for var in ("FARM_BROKER_URL", "FARM_DATABASE_URL", "FARM_WEB_TOKEN"):
    os.environ.pop(var, None)

from tests import pgutil  # noqa: E402

if pgutil.enabled():
    # `make test-postgres`: the whole suite on PostgreSQL; the shared workers use this session database.
    os.environ["FARM_DATABASE_URL"] = SESSION_DATABASE = pgutil.create_database("farm_s")

from farm.config import Settings, load_settings  # noqa: E402
from farm.db import Batch, migrate, session_scope  # noqa: E402

BATCH_TIMEOUT = float(os.environ.get("FARM_TEST_BATCH_TIMEOUT", "600"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if pgutil.enabled():
        pgutil.drop_database(SESSION_DATABASE)
    if not os.environ.get("FARM_TEST_KEEP_HOME"):
        shutil.rmtree(SESSION_HOME, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(pytest.mark.usefixtures("postgres_server"))


@pytest.fixture(scope="session")
def postgres_server() -> None:
    """Tests marked postgres need the server: skip with the reason here, fail in CI."""
    pgutil.require()


@pytest.fixture(autouse=True)
def _fresh_database_per_test(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """In PostgreSQL mode, a test that does not use the shared workers gets an empty database of its own
    (as it gets an empty SQLite file under its own FARM_HOME in the default mode)."""
    if (
        not pgutil.enabled()
        or "stack" in request.fixturenames
        or request.node.get_closest_marker("shares_db")
    ):
        yield
        return
    url = pgutil.create_database()
    monkeypatch.setenv("FARM_DATABASE_URL", url)
    try:
        yield
    finally:
        pgutil.drop_database(url)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[object]:
    """The embedded Redis plus one real `farm worker` per device and the control worker, for the session."""
    from farm.stack import Stack

    with Stack(settings) as st:
        st.start_workers()
        yield st


@pytest.fixture
def temp_db(tmp_path: Path) -> str:
    """A fresh, migrated SQLite database of its own."""
    url = f"sqlite:///{tmp_path / 'farm.db'}"
    migrate(url)
    return url


def wait_for_batch(settings: Settings, batch_id: str, stack: object, timeout: float = BATCH_TIMEOUT) -> str:
    """Poll SQL until the batch is closed; fail with the workers' logs if a worker died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        with session_scope(settings.database_url) as s:
            status = s.get(Batch, batch_id).status
        if status in ("done", "cancelled", "failed"):
            return status
        time.sleep(0.3)
    logs = "\n".join(f"--- {p.name}\n{p.log.read_text(errors='replace')[-3000:]}" for p in stack.procs)
    raise AssertionError(f"batch {batch_id} still {status} after {timeout}s\n{logs}")


@pytest.fixture
def wait_batch(settings: Settings, stack: object):
    """Wait for a batch submitted by the test to close; returns its final status."""
    return lambda batch_id, timeout=BATCH_TIMEOUT: wait_for_batch(settings, batch_id, stack, timeout)


@pytest.fixture
def run_batch(settings: Settings, stack: object):
    """Submit a manifest to the real workers and wait for the batch to close; returns the batch id."""
    from farm import dispatch

    def _run(text: str) -> str:
        done = dispatch.submit(text, settings=settings)
        assert wait_for_batch(settings, done.batch_id, stack) == "done"
        return done.batch_id

    return _run


#: One item of three candidates on the tiny model: the slice tests/test_records.py and tests/test_rounds.py
#: write to (``slice_ids``).
SLICE_MANIFEST = """
name: records
model: tiny
defaults: {candidates: 3, steps: 1, size: 32x32}
items:
  - "a kite"
"""


@pytest.fixture
def slice_ids(monkeypatch, tmp_path) -> tuple[str, list[str]]:
    """A fresh FARM_HOME's database holding one batch of SLICE_MANIFEST: its url and candidate ids, sorted."""
    from sqlalchemy import select

    from farm import dispatch
    from farm.db import Candidate

    monkeypatch.setenv("FARM_HOME", str(tmp_path))
    url = load_settings().database_url
    migrate(url)
    manifest, items = dispatch.plan(SLICE_MANIFEST, settings=load_settings())
    done = dispatch.create_batch(manifest, items, SLICE_MANIFEST, settings=load_settings())
    with session_scope(url) as s:
        ids = list(s.scalars(select(Candidate.id).where(Candidate.batch_id == done.batch_id)))
    return url, sorted(ids)
