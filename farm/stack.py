"""Starting and stopping the farm's processes on one machine: `farm up`, `farm demo` and the tests share this.

Each piece is a real subprocess (the embedded redis-server, one `farm worker` per device, the control worker,
the web app, Flower). Stopping sends SIGTERM (Celery's warm shutdown: the slice in flight finishes), waits,
then kills what is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from farm.config import Settings
from farm.db import migrate
from farm.embedded import EmbeddedRedis


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    extra_env: dict[str, str] | None = None
    restarts: int = 0


@dataclass
class Stack:
    settings: Settings
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    redis: EmbeddedRedis | None = None
    procs: list[Proc] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.settings.home / "logs"

    def prepare(self) -> None:
        """Folders, the embedded broker when no external one is configured, and the schema."""
        for d in (self.settings.home, self.settings.artifacts_dir, self.settings.models_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.settings.embedded_broker and self.redis is None:
            self.redis = EmbeddedRedis(self.settings.home / "redis", self.settings.redis_socket).start()
        migrate(self.settings.database_url)

    def spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        log = self.log_dir / f"{name}.log"
        env = {**self.env, **(extra_env or {}), "PYTHONUNBUFFERED": "1"}
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        proc = Proc(name, popen, log, extra_env)
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
            new = self.spawn(p.name, list(p.popen.args), p.extra_env)
            new.restarts = p.restarts + 1
            restarted.append(p.name)
        return restarted

    def stop(self, timeout: float = 60.0) -> None:
        for p in self.procs:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
        self.procs.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> Stack:
        self.prepare()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
