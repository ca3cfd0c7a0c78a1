"""The schema: migrations up and down, on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from farm.db import Batch, downgrade, get_engine, migrate, session_scope
from tests import pgutil

TABLES = {"batches", "items", "candidates", "workers", "item_rounds"}


def _roundtrip(url: str) -> None:
    migrate(url)
    assert TABLES <= set(inspect(get_engine(url)).get_table_names())
    _item_rounds_down_and_up(url)
    downgrade(url, "base")
    assert not TABLES & set(inspect(get_engine(url)).get_table_names())
    migrate(url)
    migrate(url)  # a second start finds the schema at head and changes nothing
    assert TABLES <= set(inspect(get_engine(url)).get_table_names())


def _item_rounds_down_and_up(url: str) -> None:
    """0005 on a database with a ranked item: a round's number is unique per item (the backstop behind the
    rank's guard), the downgrade drops the rounds and nothing else, the upgrade brings the table back."""
    from farm.db import Item, ItemRound

    with session_scope(url) as s:
        s.add(Batch(id="b1", name="b", model="tiny", manifest_yaml="", settings={}, items_total=1,
                    candidates_total=0))
        s.add(Item(id="b1-0", batch_id="b1", index=0, prompt="a fox", params={}, candidates_total=0))
        s.flush()
        s.add(ItemRound(item_id="b1-0", number=0, kind="ranked", winners=[], ranking={}, considered=0))
    with pytest.raises(IntegrityError), session_scope(url) as s:
        s.add(ItemRound(item_id="b1-0", number=0, kind="ranked", winners=[], ranking={}, considered=0))
    downgrade(url, "0004")
    assert "item_rounds" not in inspect(get_engine(url)).get_table_names()
    migrate(url)
    with session_scope(url) as s:
        assert s.scalar(select(func.count()).select_from(ItemRound)) == 0
        assert s.get(Item, "b1-0") is not None
        s.delete(s.get(Batch, "b1"))


def test_migrations_upgrade_and_downgrade_cleanly_on_sqlite(tmp_path):
    _roundtrip(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.postgres
def test_migrations_upgrade_and_downgrade_cleanly_on_postgresql():
    url = pgutil.create_database("farm_mig")
    try:
        _roundtrip(url)
    finally:
        pgutil.drop_database(url)


@pytest.mark.postgres
def test_concurrent_starts_migrate_postgresql_once(tmp_path):
    import threading

    url = pgutil.create_database("farm_mig2")
    errors: list[BaseException] = []

    def start() -> None:
        try:
            migrate(url)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=start) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and TABLES <= set(inspect(get_engine(url)).get_table_names())
    finally:
        pgutil.drop_database(url)


def test_the_migrations_build_exactly_the_schema_the_models_declare(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from farm.db import Base

    url = f"sqlite:///{tmp_path / 'drift.db'}"
    migrate(url)
    with get_engine(url).connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_a_read_only_session_does_not_wait_for_a_writer_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'farm.db'}"
    migrate(url)
    with get_engine(url).begin() as writer:  # holds SQLite's write lock until the block ends
        writer.execute(text("UPDATE workers SET pid = 1"))
        # A writing session would wait for the lock here until the busy timeout and then fail.
        with session_scope(url, read_only=True) as s:
            assert s.scalar(select(func.count()).select_from(Batch)) == 0
