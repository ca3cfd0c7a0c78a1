"""Fault case 9: the database connection is killed (pg_terminate_backend) while rank holds its transaction."""

from __future__ import annotations

import psycopg2
import pytest
from sqlalchemy.engine import make_url

from tests import pgutil
from tests.faults.conftest import FaultFarm, manifest

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture(scope="module")
def pg_farm(tmp_path_factory: pytest.TempPathFactory):
    pgutil.require()
    url = pgutil.create_database("farm_pgf")
    farm = FaultFarm(tmp_path_factory.mktemp("pgfarm"), {"FARM_DATABASE_URL": url})
    farm.start()
    try:
        yield farm
    finally:
        farm.stack.stop()
        pgutil.drop_database(url)


def _rank_backends(url: str) -> list[int]:
    """Server pids of connections of this database sitting inside an open transaction."""
    u = make_url(pgutil.ADMIN_URL)
    conn = psycopg2.connect(host=u.host, port=u.port or 5432, user=u.username, dbname=u.database)
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND state = 'idle in transaction'",
            (make_url(url).database,),
        )
        pids = [r[0] for r in cur.fetchall()]
    conn.close()
    return pids


def _terminate(pids: list[int]) -> None:
    u = make_url(pgutil.ADMIN_URL)
    conn = psycopg2.connect(host=u.host, port=u.port or 5432, user=u.username, dbname=u.database)
    conn.autocommit = True
    with conn.cursor() as cur:
        for pid in pids:
            cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    conn.close()


def test_a_database_connection_killed_mid_callback_is_retried_and_the_batch_closes(pg_farm: FaultFarm):
    url = pg_farm.settings.database_url
    batch_id = pg_farm.submit(
        manifest("pg-kill", ["a stone bridge [[fault:rank:sleep:*]]", "a wooden bridge"])
    )
    pg_farm.wait_until(
        lambda: bool(_rank_backends(url)) and any(c.status == "passed" for c in pg_farm.candidates(batch_id)),
        timeout=240,
        what="rank inside its transaction",
    )
    _terminate(_rank_backends(url))
    assert pg_farm.wait(batch_id, timeout=300) == "done"
    rows = pg_farm.assert_accounted_for(batch_id, 8)
    ranked = [c for c in rows if c.rank is not None]
    assert ranked and all(it.winners for it in pg_farm.items(batch_id))
