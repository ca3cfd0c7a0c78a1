"""The farm's tables as SQL Core sees them, and a read-only connection: shared by the modules that read and
write candidates, items and batches with SQL Core instead of the ORM (farm.records, farm.rounds), because
they run for every slice and every rank, where ORM loading cost more than the SQL."""

from __future__ import annotations

from sqlalchemy import Connection

from farm.db import READ_ONLY, Batch, Candidate, Item, ItemRound, get_engine

CANDIDATES, ITEMS, BATCHES, ROUNDS = Candidate.__table__, Item.__table__, Batch.__table__, ItemRound.__table__


def reading(url: str) -> Connection:
    """A read-only connection (no ORM session: these reads run for every slice): on SQLite it begins deferred,
    so it neither waits for a writer nor holds one up."""
    return get_engine(url).execution_options(**{READ_ONLY: True}).connect()
