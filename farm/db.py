"""The farm's records in SQL: batches, items (and their ranking rounds), candidates, workers. SQL is the
source of truth for progress.

Engines are created per process (keyed by pid) so a forked Celery child never reuses its parent's
connections. SQLite runs in WAL mode and every transaction begins IMMEDIATE, so concurrent writers from
several worker processes wait for each other instead of failing with "database is locked".
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from farm.states import BatchStatus, CandidateStatus, ItemStatus

# Statuses, their sets and transitions: farm.states.
CANDIDATE_STAGES = ("generate", "moderate", "validate", "score")

# Errors after which the same transaction may well succeed: a dropped connection, a restarted server, a lock
# wait that ran out. Tasks retry on these (with backoff) instead of failing the candidate.
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    status: Mapped[str] = mapped_column(String(16), default=BatchStatus.QUEUED, index=True)
    model: Mapped[str] = mapped_column(String(500))
    priority: Mapped[int] = mapped_column(Integer, default=5)
    tags: Mapped[list] = mapped_column(JSON, default=list)
    #: Loaded only when read (an export): a 10,000-item manifest is large, and every stage reads its batch.
    manifest_yaml: Mapped[str] = mapped_column(Text, deferred=True)
    settings: Mapped[dict] = mapped_column(JSON)
    items_total: Mapped[int] = mapped_column(Integer)
    items_done: Mapped[int] = mapped_column(Integer, default=0)
    candidates_total: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Item(Base):
    __tablename__ = "items"

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(String(500), default="")
    params: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=ItemStatus.PENDING, index=True)
    candidates_total: Mapped[int] = mapped_column(Integer)
    rounds: Mapped[int] = mapped_column(Integer, default=0)
    resends: Mapped[int] = mapped_column(Integer, default=0)
    winners: Mapped[list] = mapped_column(JSON, default=list)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Candidate(Base):
    __tablename__ = "candidates"
    # (batch_id, updated_at): each slice's near-duplicate check reads the batch's rows changed since its last
    # read; with batch_id alone SQLite walked every candidate of the batch, every slice.
    __table_args__ = (
        Index("ix_candidates_item_status", "item_id", "status"),
        Index("ix_candidates_batch_updated", "batch_id", "updated_at"),
        Index("ix_candidates_lease_expires", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    round: Mapped[int] = mapped_column(Integer, default=0)
    seed: Mapped[int] = mapped_column(BigInteger)
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=CandidateStatus.PENDING, index=True)
    stage: Mapped[str | None] = mapped_column(String(16), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    stage_attempts: Mapped[dict] = mapped_column(JSON, default=dict)
    image_path: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    pdq_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    verdict: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reasons: Mapped[list] = mapped_column(JSON, default=list)
    moderation: Mapped[list] = mapped_column(JSON, default=list)
    alignment: Mapped[float | None] = mapped_column(Float, nullable=True)
    attributes: Mapped[dict] = mapped_column(JSON, default=dict)
    preference: Mapped[float | None] = mapped_column(Float, nullable=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    rank: Mapped[int | None] = mapped_column(Integer, nullable=True)
    is_winner: Mapped[bool] = mapped_column(Boolean, default=False)
    timings: Mapped[dict] = mapped_column(JSON, default=dict)
    recipe: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: The lease of the process working on this candidate (farm.tasks.lease): its generation, which every
    #: stage write must still match (a fencing token), who holds it, and until when. No expiry: not held
    #: (queued, handed on, settled); an expiry in the past: its holder stopped renewing, the reaper re-sends.
    lease_token: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(250), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow, index=True)


class ItemRound(Base):
    """One ranking of an item, written in the transaction of the decision it records (farm.rounds): a top-up
    (its ranking at the time, otherwise lost when the item closes over more candidates), the rank that
    closed it, and the kinds farm.states.RoundKind adds later. The latest round's winners are the item's
    ``winners``. A raced or repeated rank writes none: the guard of the decision decides, and the key
    (item_id, number) backs up the batch lock under which rounds of one item are numbered."""

    __tablename__ = "item_rounds"

    #: The key (item_id, number) is unique and its index, led by item_id, serves reads by item.
    item_id: Mapped[str] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    #: 0-based, in the order written; not ``Candidate.round`` (a retried item is ranked again).
    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    #: A farm.states.RoundKind.
    kind: Mapped[str] = mapped_column(String(16))
    #: Candidate ids, best first.
    winners: Mapped[list] = mapped_column(JSON, default=list)
    #: Candidate id -> {"rank": 1-based position, "score": composite} of every candidate ranked.
    ranking: Mapped[dict] = mapped_column(JSON, default=dict)
    #: How many candidates the round ranked (passed ones: scored, not rejected or failed).
    considered: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Worker(Base):
    """One row per worker process: what it serves, what it has loaded and how often, what it is doing."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    queue: Mapped[str] = mapped_column(String(64))
    device: Mapped[str] = mapped_column(String(64))
    pid: Mapped[int] = mapped_column(Integer)
    hostname: Mapped[str] = mapped_column(String(200))
    models: Mapped[dict] = mapped_column(JSON, default=dict)
    #: Registry keys loaded now (written by the pool child); ``models`` counts loads, evicted ones included.
    loaded: Mapped[list | None] = mapped_column(JSON, nullable=True)
    #: Queues the worker consumes now (written by its main process; farm.placement).
    queues: Mapped[list | None] = mapped_column(JSON, nullable=True)
    current: Mapped[str | None] = mapped_column(String(200), nullable=True)
    #: The denoising step the slice it generates has reached, of ``steps`` (written at most once a second
    #: while it generates, cleared when its task ends): the dashboard's per-step progress.
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tasks_done: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


_engines: dict[tuple[int, str], Engine] = {}
READ_ONLY = "farm_read_only"
_lock = threading.Lock()


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front (no upgrade deadlock); readers never wait for a writer in WAL.
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def get_engine(url: str) -> Engine:
    """The engine for ``url`` in this process, created on first use (never inherited across fork)."""
    key = (os.getpid(), url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            if url.startswith("sqlite"):
                path = url.split("///", 1)[-1]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"timeout": 60})
                _sqlite_setup(engine)
            else:
                engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
            _engines[key] = engine
        return engine


def _forget_inherited_engines() -> None:
    for (pid, _url), engine in list(_engines.items()):
        if pid != os.getpid():
            engine.dispose(close=False)
            _engines.pop((pid, _url), None)


os.register_at_fork(after_in_child=_forget_inherited_engines)


@contextmanager
def session_scope(url: str, *, read_only: bool = False) -> Iterator[Session]:
    """A session that commits on success and rolls back on error.

    ``read_only`` sessions (that must not write) do not take SQLite's write lock, so a reader neither waits
    for a stage's write nor makes one wait (stages, rank and the dashboard read often)."""
    engine = get_engine(url)
    maker = sessionmaker(
        bind=engine.execution_options(**{READ_ONLY: True}) if read_only else engine, expire_on_commit=False
    )
    session = maker()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema up to ``revision`` with alembic; the farm runs this on start."""
    from alembic import command

    engine = get_engine(url)
    if engine.dialect.name != "postgresql":
        command.upgrade(alembic_config(url), revision)
        return
    # Web, control and every worker migrate on start; on PostgreSQL they take turns.
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT pg_advisory_lock(734105)")
        try:
            command.upgrade(alembic_config(url), revision)
        finally:
            conn.exec_driver_sql("SELECT pg_advisory_unlock(734105)")
            conn.commit()


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["engine"] = get_engine(url)
    return cfg
