"""Processes tied to their parent, and the embedded Redis keeper: real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from farm.embedded import EmbeddedRedis
from farm.lifeline import tied
from farm.procs import alive, leftovers
from tests import pgutil

# Signals and processes do not depend on the database: CI runs these in its SQLite pass only.
pytestmark = pgutil.sqlite_pass_only


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _owner(code: str, home: Path) -> tuple[subprocess.Popen[str], int]:
    """A Python process running ``code`` (which prints a pid) in its own session; returns it and that pid."""
    owner = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", code, str(home)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "FARM_HOME": str(home)},
    )
    return owner, int(owner.stdout.readline())


def test_a_tied_program_dies_when_the_process_that_started_it_is_killed(tmp_path):
    code = (
        "import subprocess, sys, time\n"
        "from farm.lifeline import tied\n"
        "child = subprocess.Popen(tied(['sleep', '300']))\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    owner, child = _owner(code, tmp_path)
    assert not _gone(child, 0.5), "the tied program runs while its parent lives"
    owner.kill()
    owner.wait()
    assert _gone(child, 10), "the tied program outlived its parent"


def test_tied_argv_ends_with_the_program_own_argv():
    argv = ["celery", "-A", "farm.celery_app", "worker"]
    assert tied(argv)[-4:] == argv


def test_embedded_redis_ignores_the_owner_group_ctrl_c_and_stops_when_asked(tmp_path):
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from farm.embedded import EmbeddedRedis\n"
        "home = Path(sys.argv[1])\n"
        "server = EmbeddedRedis(home / 'redis', home / 'redis.sock').start()\n"
        "try:\n"  # the pid is printed inside: the Ctrl-C that follows it must land in this try
        "    print(server.process.pid, flush=True)\n"
        "    time.sleep(300)\n"
        "except KeyboardInterrupt:\n"
        "    time.sleep(1.0)\n"
        "    assert server.ping(), 'Redis must survive the group Ctrl-C until its owner stops it'\n"
        "    server.stop()\n"
    )
    owner, keeper = _owner(code, tmp_path)
    os.killpg(owner.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
    assert owner.wait(30) == 0, "the owner saw Redis gone before it stopped it"
    assert _gone(keeper, 10) and not leftovers(tmp_path)


def test_embedded_redis_outlives_a_killed_owner_while_clients_finish_then_stops(tmp_path):
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from farm.embedded import EmbeddedRedis\n"
        "home = Path(sys.argv[1])\n"
        "server = EmbeddedRedis(home / 'redis', home / 'redis.sock', grace=60).start()\n"
        "print(server.process.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    owner, keeper = _owner(code, tmp_path)
    client = redis.Redis(unix_socket_path=str(tmp_path / "redis.sock"))
    assert client.ping()
    owner.kill()
    owner.wait()
    time.sleep(1.5)
    assert client.ping(), "Redis stopped while a client (a worker finishing its task) still used it"
    client.close()
    assert _gone(keeper, 20), "the keeper did not stop Redis once its last client left"
    assert not leftovers(tmp_path)


def test_a_restarted_owner_takes_over_from_the_keeper_of_a_killed_one_at_once(tmp_path):
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from farm.embedded import EmbeddedRedis\n"
        "home = Path(sys.argv[1])\n"
        "server = EmbeddedRedis(home / 'redis', home / 'redis.sock', grace=600).start()\n"
        "print(server.process.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    owner, keeper = _owner(code, tmp_path)
    client = redis.Redis(unix_socket_path=str(tmp_path / "redis.sock"))
    client.rpush("queue", "message")
    owner.kill()
    owner.wait()
    time.sleep(1.0)
    assert client.ping(), "the keeper waits for its client"
    server = EmbeddedRedis(tmp_path / "redis", tmp_path / "redis.sock")
    try:
        server.start()  # a supervisor restarting `farm up` while the old keeper still waits
        assert _gone(keeper, 5)
        again = redis.Redis(unix_socket_path=str(tmp_path / "redis.sock"))
        assert again.lrange("queue", 0, -1) == [b"message"]
    finally:
        client.close()
        server.stop()


def test_embedded_redis_restarts_in_place_with_its_queued_data(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", tmp_path / "redis.sock").start()
    try:
        client = redis.Redis(unix_socket_path=str(tmp_path / "redis.sock"))
        client.rpush("queue", "message")
        server.stop()
        assert not server.ping()
        server.start()
        again = redis.Redis(unix_socket_path=str(tmp_path / "redis.sock"))
        assert again.lrange("queue", 0, -1) == [b"message"]
    finally:
        server.stop()
