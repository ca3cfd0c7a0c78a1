"""Starting and stopping the farm's processes on one machine: `farm up`, `farm demo` and the tests share this.

Each piece is a real subprocess (the embedded redis-server, one `farm worker` per device, the control worker,
the web app, Flower), each in a session of its own (a terminal's Ctrl-C reaches only the owner, which decides
the order) and tied to the owner with farm.lifeline (when the owner is killed outright, they die with it).
Stopping sends SIGTERM (a device worker drains: the slices in flight are recorded), waits, then kills what is
left; Redis stops last, once the workers no longer need it. ``hurry`` (a second Ctrl-C) cuts the wait short
with Celery's cold shutdown, which puts the messages in hand back in the queue.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from farm.config import Settings
from farm.db import migrate
from farm.embedded import EmbeddedRedis
from farm.lifeline import tied

#: Seconds between the reports of what a stop waits for, and the cold shutdown's allowance after ``hurry``.
REPORT_S = 5.0
HURRY_S = 10.0
#: Beyond FARM_DRAIN_TIMEOUT: a drained worker's warm shutdown and its QC worker's stop.
STOP_GRACE_S = 30.0


def _killpg_quietly(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    argv: list[str]
    extra_env: dict[str, str] | None = None
    restarts: int = 0


@dataclass
class Stack:
    settings: Settings
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    redis: EmbeddedRedis | None = None
    procs: list[Proc] = field(default_factory=list)

    @property
    def drain_allowance(self) -> float:
        """How long a stop waits for drained workers to exit before killing them."""
        return float(self.settings.drain_timeout) + STOP_GRACE_S

    @property
    def log_dir(self) -> Path:
        return self.settings.home / "logs"

    def prepare(self) -> None:
        """Folders, the embedded broker when no external one is configured, and the schema."""
        for d in (self.settings.home, self.settings.artifacts_dir, self.settings.models_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.settings.embedded_broker and self.redis is None:
            self.redis = EmbeddedRedis(
                self.settings.home / "redis",
                self.settings.redis_socket,
                grace=float(self.settings.drain_timeout),
            ).start()
        migrate(self.settings.database_url)

    def spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        log = self.log_dir / f"{name}.log"
        env = {**self.env, **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                tied(argv),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        proc = Proc(name, popen, log, list(argv), extra_env)
        self.procs.append(proc)
        return proc

    def start_worker(self, queue: str, extra_env: dict[str, str] | None = None) -> Proc:
        return self.spawn(
            f"worker-{queue}", [sys.executable, "-m", "farm", "worker", "--device", queue], extra_env
        )

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def restart_worker(
        self, queue: str, extra_env: dict[str, str] | None = None, timeout: float = 120
    ) -> Proc:
        """Stop the device's worker (SIGTERM, then SIGKILL) if it still runs, and start a fresh one."""
        old = self.proc(f"worker-{queue}")
        if old.popen.poll() is None:
            old.popen.send_signal(signal.SIGTERM)
            try:
                old.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(old.popen.pid, signal.SIGKILL)
                old.popen.wait()
        self.procs.remove(old)
        return self.start_worker(queue, extra_env)

    def start_control(self) -> Proc:
        return self.spawn("control", [sys.executable, "-m", "farm", "worker", "--control"])

    def start_web(self) -> Proc:
        return self.spawn("web", [sys.executable, "-m", "farm", "web"])

    def start_flower(self) -> Proc:
        s = self.settings
        return self.spawn(
            "flower",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "farm.celery_app",
                "flower",
                f"--address={s.web_host}",
                f"--port={s.flower_port}",
                f"--basic-auth={s.flower_auth}",
            ],
        )

    def start_workers(self) -> None:
        for queue in self.settings.devices:
            self.start_worker(queue)
        self.start_control()

    def check_alive(self) -> None:
        for p in self.procs:
            code = p.popen.poll()
            if code is not None:
                tail = p.log.read_text(errors="replace")[-3000:] if p.log.exists() else ""
                raise RuntimeError(f"{p.name} exited with code {code}; end of {p.log}:\n{tail}")

    def supervise(self) -> list[str]:
        """Restart any process that died (as Restart=always does under systemd); returns their names."""
        restarted = []
        for p in list(self.procs):
            if p.popen.poll() is None:
                continue
            self.procs.remove(p)
            new = self.spawn(p.name, p.argv, p.extra_env)
            new.restarts = p.restarts + 1
            restarted.append(p.name)
        return restarted

    def stop(
        self,
        timeout: float = 60.0,
        *,
        report: Callable[[str], None] | None = None,
        hurry: threading.Event | None = None,
    ) -> None:
        """SIGTERM every process, wait up to ``timeout`` for them to exit, kill what is left, then stop Redis.

        ``report`` is called every few seconds with what the stop still waits for. Once ``hurry`` is set, the
        workers get SIGQUIT (Celery's cold shutdown) and a few seconds before they are killed.
        """
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        next_report = time.monotonic() + REPORT_S
        hurried = False
        while self._alive() and time.monotonic() < deadline:
            if hurry is not None and hurry.is_set() and not hurried:
                hurried = True
                deadline = min(deadline, time.monotonic() + HURRY_S)
                for p in self._alive():
                    p.popen.send_signal(signal.SIGQUIT)
            if report is not None and time.monotonic() >= next_report:
                report(self.waiting_for())
                next_report = time.monotonic() + REPORT_S
            time.sleep(0.1)
        for p in self._alive():
            _killpg_quietly(p.popen.pid)
        for p in self.procs:
            p.popen.wait()
            _killpg_quietly(p.popen.pid)  # a pool child or QC worker its main process left behind
        self.procs.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def _alive(self) -> list[Proc]:
        return [p for p in self.procs if p.popen.poll() is None]

    def waiting_for(self) -> str:
        """What a stop still waits for, e.g. ``worker-cuda0 (3 candidates in flight), control``."""
        parts = []
        for p in self._alive():
            queue = p.name.removeprefix("worker-") if p.name.startswith("worker-") else None
            detail = ""
            if queue is not None:
                try:
                    from farm.worker import in_flight

                    detail = f" ({in_flight(self.settings.database_url, queue)} candidates in flight)"
                except Exception:  # the database is away: the name alone
                    detail = ""
            parts.append(p.name + detail)
        return ", ".join(parts)

    def __enter__(self) -> Stack:
        self.prepare()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
