"""A second "host" on this machine for tests: a network namespace joined to the root one by a veth pair.

Everything is built with iproute2 (`ip netns`, `ip link`), which needs root. Where that is not possible the
test skips with the reason, except in CI (CI=true, run as root), where it is a failure. Only the filesystem
is shared between the two sides; the network of the namespace is its own (its loopback reaches nothing of
the root namespace), so whatever a process in it reaches, it reaches over the veth addresses.

Also here: a TCP forwarder (a service that listens only on 127.0.0.1 made reachable on a veth address, as a
real host would publish it) and a redis-server bound to one address only.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis


def unavailable() -> str | None:
    """None when this process may create network namespaces, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    return None


def refuse(why: str) -> None:
    """Skip with the reason; in CI, where namespaces must work, fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must be able to create network namespaces: {why}")
    pytest.skip(why)


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _free_subnet() -> int:
    """A third octet N such that 10.231.N.0/30 is on no interface of this machine."""
    used = set(re.findall(r"inet 10\.231\.(\d+)\.", _ip("-4", "-o", "addr", "show").stdout))
    free = [n for n in range(256) if str(n) not in used]
    if not free:
        raise RuntimeError("no free 10.231.N.0/30 subnet")
    return secrets.choice(free)


@dataclass
class VethNamespace:
    """Namespace ``name``; ``host_ip`` on ``host_if`` in the root namespace, ``peer_ip`` inside it."""

    name: str
    host_if: str
    peer_if: str
    host_ip: str
    peer_ip: str

    @classmethod
    def create(cls) -> VethNamespace:
        """Build it, or skip / fail (CI) with the reason when this machine does not allow it."""
        why = unavailable()
        if why:
            refuse(why)
        tag = secrets.token_hex(3)
        n = _free_subnet()
        ns = cls(f"farmtest-{tag}", f"fv{tag}h", f"fv{tag}p", f"10.231.{n}.1", f"10.231.{n}.2")
        steps = [
            ("netns", "add", ns.name),
            ("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.peer_if),
            ("link", "set", ns.peer_if, "netns", ns.name),
            ("addr", "add", f"{ns.host_ip}/30", "dev", ns.host_if),
            ("link", "set", ns.host_if, "up"),
            ("-n", ns.name, "addr", "add", f"{ns.peer_ip}/30", "dev", ns.peer_if),
            ("-n", ns.name, "link", "set", ns.peer_if, "up"),
            ("-n", ns.name, "link", "set", "lo", "up"),
        ]
        for step in steps:
            done = _ip(*step)
            if done.returncode != 0:
                ns.delete()
                refuse(f"`ip {' '.join(step)}` failed: {done.stderr.strip()}")
        return ns

    def delete(self) -> None:
        """Remove the pair and the namespace; safe to call on a half-built one."""
        _ip("link", "del", self.host_if)
        _ip("netns", "del", self.name)

    def exec_argv(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace. `ip netns exec` execs the command in place (no fork), so the
        pid of the process started with this argv is the command's own."""
        return ["ip", "netns", "exec", self.name, *argv]

    def holds(self, pid: int) -> bool:
        """Whether process ``pid`` lives in this namespace (same network namespace inode)."""
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{self.name}").st_ino

    def __enter__(self) -> VethNamespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TcpForwarder:
    """Listens on ``listen_host`` (a free port) and pipes each connection to ``target``; records the address
    every connection came from. Runs an asyncio loop in a daemon thread of the test process."""

    def __init__(self, listen_host: str, target: tuple[str, int]) -> None:
        self.listen_host = listen_host
        self.target = target
        self.port = 0
        self.peers: set[str] = set()
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tcp-forwarder")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> TcpForwarder:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        self.peers.add(down_w.get_extra_info("peername")[0])
        self.connections += 1
        self._writers.add(down_w)
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            down_w.close()
            self._writers.discard(down_w)
            return
        self._writers.add(up_w)
        await asyncio.gather(self._pipe(down_r, up_w), self._pipe(up_r, down_w))
        self._writers.difference_update((down_w, up_w))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # Either side ending ends the connection: closing this writer makes the other pipe's read end too.
            writer.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class TcpRedis:
    """A redis-server (the binary ``binary``) on TCP, bound to ``host`` only, with the farm's production
    settings: append-only, noeviction."""

    def __init__(self, binary: str, host: str, data_dir: Path) -> None:
        self.binary = binary
        self.host = host
        self.port = free_port(host)
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, socket_timeout=5)

    def start(self, timeout: float = 20) -> TcpRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    f"bind {self.host}",
                    f"port {self.port}",
                    "protected-mode no",
                    "appendonly yes",
                    "appendfsync everysec",
                    'save ""',
                    "maxmemory-policy noeviction",
                    f"dir {self.data_dir}",
                    f"logfile {self.data_dir / 'redis.log'}",
                    "daemonize no",
                    "",
                ]
            )
        )
        self.process = subprocess.Popen([self.binary, str(conf)], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return self
            except (redis.RedisError, OSError):
                pass
            if self.process.poll() is not None:
                log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{log}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.url} within {timeout}s")

    def client_addresses(self) -> set[str]:
        """The IP address of every client connected now (CLIENT LIST)."""
        return {c["addr"].rsplit(":", 1)[0] for c in self.client().client_list()}

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
