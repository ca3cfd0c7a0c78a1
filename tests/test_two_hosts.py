"""Two hosts, for real: a second farm host in its own network namespace joins the first over a veth pair,
serves part of a batch, is SIGKILLed mid-batch, and the batch still completes with every candidate exactly
once.

First host (the root namespace): a TCP Redis bound only to the host end of the veth, PostgreSQL published on
that same address (a forwarder to the local server, which listens on 127.0.0.1 only), the artifact store, a
device worker ``cuda0`` and the control worker. Second host (the namespace): one `farm worker --device b0`
with its own FARM_HOME, pointed at the first host's Redis and PostgreSQL over the veth. The two share the
filesystem, not the network: the second host's FARM_HOME/artifacts is a symlink to the first host's
artifacts folder, which stands for the shared mount (NFS, CephFS...) every host of a fleet mounts.

The second host is killed while it runs the moderate stage of a slice it generated: that message, for b0's
own queue, dies unacknowledged with the worker, and Redis puts it back in queue b0 once the visibility
timeout passes. No live worker serves b0 any more, so the slice is stranded until the reaper re-sends it
through the shared queue; the test checks that the message did come back to b0, that the reaper re-sent the
item, and that the first host finished those candidates.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from farm.celery_app import make_app
from farm.config import load_settings
from farm.embedded import redis_server_binary
from farm.stack import Proc, Stack
from farm.worker import IN_FLIGHT, device_workers, queue_keys
from tests import pgutil
from tests.faults.conftest import FaultFarm, manifest
from tests.netns import TcpForwarder, TcpRedis, VethNamespace

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

ITEMS, CANDIDATES = 8, 4
THROUGH = ("scored", "passed", "rejected")  # a candidate that went through every device stage

# Short timeouts so that recovery is observable within the test (as in the fault suite). The stall limit is
# longer than the visibility timeout plus kombu's restore sweep (10 s): the reaper cannot act before the
# message b0's worker had taken is back in queue b0, so it must re-send work that sits in the queue of a
# device no live worker serves (what a long batch meets in production, where the reaper is held back while
# queues are busy). One thread per worker: the two "hosts" share this machine's cores. The tiny model runs a
# slice in a fraction of a second, so every slice's moderate stage takes FARM_FAULT_SLEEP_S on its first
# delivery (the farm's own fault hook, in the prompt): the batch lasts long enough for both hosts to serve
# it, and a slice generated on b0 stays in b0 long enough to be caught there.
FLEET_ENV = {
    "FARM_FAULTS": "1",
    "FARM_FAULT_SLEEP_S": "2",
    "FARM_SLICE_SIZE": "2",
    "FARM_TASK_TIME_LIMIT": "30",
    "FARM_VISIBILITY_TIMEOUT": "40",
    "FARM_STALL_SECONDS": "60",
    "FARM_REAPER_INTERVAL": "4",
    "FARM_MAX_ATTEMPTS": "3",
    "FARM_WORKER_THREADS": "1",
}


class HostFarm(FaultFarm):
    """The first host, driven like the fault suite's farm (same reads and checks), on external services."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.own_database = None
        self.settings = load_settings(env)
        self.stack = Stack(self.settings, env=env)
        self.app = make_app(self.settings)


@dataclass
class TwoHosts:
    ns: VethNamespace
    redis: TcpRedis
    postgres: TcpForwarder
    first: HostFarm
    second_env: dict[str, str]


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[TwoHosts]:
    pgutil.require()
    with contextlib.ExitStack() as cleanup:  # undone in reverse order, also when the test fails
        ns = VethNamespace.create()
        cleanup.callback(ns.delete)
        broker = TcpRedis(redis_server_binary(), ns.host_ip, tmp_path / "redis")
        cleanup.callback(broker.stop)
        broker.start()
        local = make_url(pgutil.ADMIN_URL)
        postgres = TcpForwarder(ns.host_ip, (local.host or "127.0.0.1", local.port or 5432)).start()
        cleanup.callback(postgres.stop)
        database_url = (
            make_url(pgutil.create_database("farm_2h"))
            .set(host=ns.host_ip, port=postgres.port)
            .render_as_string(hide_password=False)
        )
        cleanup.callback(pgutil.drop_database, database_url)

        first_home, second_home = tmp_path / "first", tmp_path / "second"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
        env.update(
            FLEET_ENV,
            FARM_HOME=str(first_home),
            FARM_BROKER_URL=broker.url,
            FARM_DATABASE_URL=database_url,
            FARM_DEVICES="cuda0=cpu",
        )
        first = HostFarm(env)
        cleanup.callback(first.stack.stop)
        first.stack.prepare()
        # The shared mount: both hosts see one artifact store; only their FARM_HOME (models, logs) differs.
        second_home.mkdir()
        (second_home / "artifacts").symlink_to(first.settings.artifacts_dir, target_is_directory=True)
        second_env = {"FARM_HOME": str(second_home), "FARM_DEVICES": "b0=cpu"}
        yield TwoHosts(ns, broker, postgres, first, second_env)


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _logs(stack: Stack) -> str:
    return "\n".join(f"--- {p.name}\n{p.log.read_text(errors='replace')[-4000:]}" for p in stack.procs)


def _wait(farm: HostFarm, predicate: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        farm.wait_until(predicate, timeout=timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_logs(farm.stack)}") from None


def test_a_second_host_serves_part_of_a_batch_over_a_veth_and_its_death_loses_nothing(two_hosts: TwoHosts):
    h, first = two_hosts, two_hosts.first
    stack = first.stack

    # Only the addresses the test created: the services are published on the veth's host end and nowhere else.
    assert make_url(first.settings.database_url).host == h.ns.host_ip
    assert first.settings.broker_url == f"redis://{h.ns.host_ip}:{h.redis.port}/0"
    assert _refused("127.0.0.1", h.redis.port), "Redis must listen on the veth address only"
    assert _refused("127.0.0.1", h.postgres.port), "the forwarder must listen on the veth address only"

    t0 = time.monotonic()
    stack.start_worker("cuda0")
    stack.start_control()
    # The second host joins with one command: a worker for its own queue, pointed at the same services.
    argv = h.ns.exec_argv([sys.executable, "-m", "farm", "worker", "--device", "b0"])
    second: Proc = stack.spawn("worker-b0", argv, h.second_env)
    _wait(
        first,
        lambda: all(device_workers(first.app, q, timeout=1) for q in ("cuda0", "b0")),
        180,
        "both hosts' workers to answer",
    )
    # `ip netns exec` replaced itself with the worker: the pid we hold is the worker's, inside the namespace.
    assert second.popen.poll() is None
    cmdline = Path(f"/proc/{second.popen.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[:4] == [sys.executable.encode(), b"-m", b"farm", b"worker"], cmdline
    assert h.ns.holds(second.popen.pid) and not h.ns.holds(os.getpid())
    ready_s = time.monotonic() - t0

    prompts = [f"a lighthouse on a rock, study {i} [[fault:moderate:sleep:*]]" for i in range(ITEMS)]
    batch_id = first.submit(manifest("two-hosts", prompts, candidates=CANDIDATES))

    # Once the second host has carried two slices through every stage, kill it while it runs the moderate
    # stage (slowed down) of another slice it generated. Its worker takes one message at a time (prefetch 1,
    # late acks), so then the one it holds is that moderate, for queue b0: the rest of the slice can only
    # come from b0 or from the reaper. (Killed a moment earlier, holding the slice's generate message from the
    # shared queue, the slice would come back there after the visibility timeout and need no reaper.)
    def b0_in_flight() -> list:
        return [c for c in first.candidates(batch_id) if c.device == "b0" and c.status in IN_FLIGHT]

    def b0_messages() -> tuple[int, int]:
        """Messages for queue b0: (waiting in it, taken by its worker and not acknowledged)."""
        client = h.redis.client()
        waiting = sum(client.llen(k) for k in queue_keys("b0"))
        taken = sum(json.loads(v)[2] == "b0" for v in client.hvals("unacked"))
        return waiting, taken

    def b0_served_and_moderating() -> bool:
        rows = [c for c in first.candidates(batch_id) if c.device == "b0"]
        through = sum(c.status in THROUGH for c in rows)
        moderating = any(c.status == "generated" and c.stage_attempts.get("moderate") == 1 for c in rows)
        return through >= 4 and moderating and b0_messages() == (0, 1)

    _wait(first, b0_served_and_moderating, 120, "b0 to serve two slices and moderate another")
    redis_clients = h.redis.client_addresses()
    os.killpg(second.popen.pid, signal.SIGKILL)
    second.popen.wait()
    killed_at = time.monotonic()
    stranded = {c.id: c.item_id for c in b0_in_flight()}
    left_in_b0 = b0_messages()
    assert stranded and left_in_b0 == (0, 1), (stranded, left_in_b0)

    # The second host really was a host of its own: it reached Redis and PostgreSQL from its veth address.
    assert h.ns.peer_ip in redis_clients, redis_clients
    assert h.ns.peer_ip in h.postgres.peers, h.postgres.peers
    assert redis_clients <= {h.ns.host_ip, h.ns.peer_ip}, redis_clients

    # What b0's worker had taken comes back into queue b0 after the visibility timeout, before the reaper
    # may act: the stranded work now sits in b0, which no live worker serves.
    _wait(first, lambda: b0_messages()[1] == 0, 90, "b0's taken messages to come back to queue b0")
    back_s = time.monotonic() - killed_at
    assert b0_messages()[0] >= 1
    resent_early = {i.id: i.resends for i in first.items(batch_id) if i.id in stranded.values() and i.resends}
    assert not resent_early, f"the reaper acted before the restore: {resent_early}"

    assert first.wait(batch_id, timeout=180, supervise=False) == "done", _logs(stack)
    recovery_s = time.monotonic() - killed_at
    rows = first.assert_accounted_for(batch_id, ITEMS * CANDIDATES)
    assert {c.device for c in rows} == {"b0", "cuda0"}, {c.device for c in rows}

    # What b0 left in its own queue was re-sent by the reaper and finished on the first host.
    items = {i.id: i for i in first.items(batch_id)}
    by_id = {c.id: c for c in rows}
    stranded_items = set(stranded.values())
    assert all(items[iid].resends >= 1 for iid in stranded_items), [
        (c.id, c.status, c.error, c.device, c.stage_attempts, c.timings)
        for c in rows
        if c.item_id in stranded_items
    ]
    for cid in stranded:
        c = by_id[cid]
        assert c.status in ("passed", "rejected"), (cid, c.status, c.error)
        assert any(t.get("queue") == "cuda0" for t in c.timings.values()), (cid, c.timings)
    assert b0_messages()[0] >= 1, "what b0 left is still there: the work was re-sent, not taken from b0"

    # Every connection either service saw came from the two veth addresses.
    assert h.postgres.peers <= {h.ns.host_ip, h.ns.peer_ip}, h.postgres.peers
    assert h.redis.client_addresses() <= {h.ns.host_ip, h.ns.peer_ip}
    print(
        f"workers up in {ready_s:.0f}s; killed b0 holding {len(stranded)} candidates, messages for b0 "
        f"(waiting, taken) {left_in_b0}, all back in b0 {back_s:.0f}s and the batch done {recovery_s:.0f}s "
        "after the kill"
    )
