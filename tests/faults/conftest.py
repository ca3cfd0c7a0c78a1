"""A farm of its own for fault tests: its own FARM_HOME, embedded Redis and workers, with short timeouts.

It is driven the way an operator drives a farm: batches go in through `farm submit` in a subprocess, workers
are real `farm worker` processes, and every assertion reads SQL, the Redis queues or the files on disk. Short
visibility and stall timeouts make recovery observable within a test's time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from farm.broker import SLICES_QUEUE, device_workers, queue_keys
from farm.celery_app import make_app
from farm.config import Settings, load_settings
from farm.db import Batch, Candidate, Item, Worker, session_scope
from farm.stack import Stack
from farm.worker import drain, undrain
from tests import pgutil

FAULT_ENV = {
    "FARM_DEVICES": "cuda0=cpu,cuda1=cpu",
    "FARM_FAULTS": "1",
    "FARM_FAULT_SLEEP_S": "8",
    "FARM_SLICE_SIZE": "2",
    "FARM_TASK_TIME_LIMIT": "30",
    "FARM_VISIBILITY_TIMEOUT": "40",
    "FARM_STALL_SECONDS": "15",
    "FARM_REAPER_INTERVAL": "4",
    "FARM_MAX_ATTEMPTS": "3",
}


class FaultFarm:
    def __init__(self, home: Path, extra: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **FAULT_ENV, "FARM_HOME": str(home), **(extra or {})}
        self.env.pop("FARM_BROKER_URL", None)
        self.own_database: str | None = None
        if "FARM_DATABASE_URL" not in (extra or {}):
            self.env.pop("FARM_DATABASE_URL", None)
            if pgutil.enabled():
                self.env["FARM_DATABASE_URL"] = self.own_database = pgutil.create_database("farm_f")
        self.settings: Settings = load_settings(self.env)
        self.stack = Stack(self.settings, env=self.env)
        self.app = make_app(self.settings)

    # -- running
    def start(self) -> None:
        self.stack.prepare()
        self.stack.start_workers()
        self.wait_ready()

    def close(self) -> None:
        """Stop every process and drop the farm's own PostgreSQL database, if it made one."""
        self.stack.stop()
        if self.own_database:
            pgutil.drop_database(self.own_database)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(device_workers(self.app, q, timeout=1) for q in self.settings.devices):
                return
            time.sleep(1)
        raise AssertionError("fault farm workers did not come up")

    def submit(self, text: str) -> str:
        path = self.settings.home / f"m{time.monotonic_ns()}.yaml"
        path.write_text(text)
        run = subprocess.run(
            [sys.executable, "-m", "farm", "submit", str(path)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout.split()[1].rstrip(":")

    def wait(self, batch_id: str, timeout: float = 400, supervise: bool = True) -> str:
        deadline = time.monotonic() + timeout
        status = "?"
        while time.monotonic() < deadline:
            if supervise:
                self.stack.supervise()
            status = self.batch(batch_id).status
            if status in ("done", "cancelled", "failed"):
                return status
            time.sleep(0.5)
        logs = "\n".join(
            f"--- {p.name}\n{p.log.read_text(errors='replace')[-4000:]}" for p in self.stack.procs
        )
        raise AssertionError(f"batch {batch_id} still {status} after {timeout}s\n{logs}")

    def wait_until(self, predicate, timeout: float = 240, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    # -- reading
    def batch(self, batch_id: str) -> Batch:
        with session_scope(self.settings.database_url) as s:
            return s.get(Batch, batch_id)

    def candidates(self, batch_id: str) -> list[Candidate]:
        with session_scope(self.settings.database_url) as s:
            return s.scalars(
                select(Candidate).where(Candidate.batch_id == batch_id).order_by(Candidate.id)
            ).all()

    def items(self, batch_id: str) -> list[Item]:
        with session_scope(self.settings.database_url) as s:
            return s.scalars(select(Item).where(Item.batch_id == batch_id).order_by(Item.index)).all()

    def workers(self) -> list[Worker]:
        with session_scope(self.settings.database_url) as s:
            return s.scalars(select(Worker)).all()

    def redis(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.settings.redis_socket))

    def slices_waiting(self) -> int:
        client = self.redis()
        return sum(client.llen(k) for k in queue_keys(SLICES_QUEUE))

    def drain_all(self) -> None:
        for queue in self.settings.devices:
            assert drain(self.app, queue, database_url=self.settings.database_url)

    def undrain_all(self) -> None:
        for queue in self.settings.devices:
            assert undrain(self.app, queue, database_url=self.settings.database_url)

    # -- the promises every fault test checks
    def assert_accounted_for(self, batch_id: str, expected: int) -> list[Candidate]:
        """Every candidate exactly once with a final status, the batch closed, files on disk match rows."""
        batch = self.batch(batch_id)
        assert batch.status == "done" and batch.items_done == batch.items_total, (
            batch.status,
            batch.items_done,
        )
        rows = self.candidates(batch_id)
        assert len(rows) == expected and len({c.id for c in rows}) == expected
        assert {c.status for c in rows} <= {"passed", "rejected", "failed"}, {c.status for c in rows}
        folder = self.settings.artifacts_dir / batch_id
        on_disk = {p.name for p in folder.glob("*.png")} if folder.exists() else set()
        in_rows = {Path(c.image_path).name for c in rows if c.image_path}
        assert on_disk == in_rows, on_disk ^ in_rows
        assert not list(folder.glob(".*.tmp")) if folder.exists() else True
        for item in self.items(batch_id):
            assert item.status == "done"
        return rows


def manifest(name: str, prompts: list[str], candidates: int = 4) -> str:
    lines = "\n".join(f'  - "{p}"' for p in prompts)
    defaults = f"{{candidates: {candidates}, steps: 2, size: 64x64}}"
    return f"name: {name}\nmodel: tiny\ndefaults: {defaults}\nitems:\n{lines}\n"


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultFarm]:
    f = FaultFarm(tmp_path_factory.mktemp("faultfarm"))
    f.start()
    try:
        yield f
    finally:
        f.close()
