"""Two hosts, for real: a second farm host in its own network namespace joins the first over a veth pair,
serves part of a batch, is SIGKILLed mid-batch, and the batch still completes with every candidate exactly
once.

First host (the root namespace): a TCP Redis bound only to the host end of the veth, PostgreSQL published on
that same address (a forwarder to the local server, which listens on 127.0.0.1 only), the artifact store, a
device worker ``cuda0`` and the control worker. Second host (the namespace): one `farm worker --device b0`
with its own FARM_HOME, pointed at the first host's Redis and PostgreSQL over the veth. The two share the
filesystem, not the network: the second host's FARM_HOME/artifacts is a symlink to the first host's
artifacts folder, which stands for the shared mount (NFS, CephFS...) every host of a fleet mounts.

The second host is killed while it runs the generate task of a slice, its rows not yet written. That
task's message, taken from a queue both hosts serve, dies unacknowledged with the worker; Redis puts it back
once the visibility timeout passes, and the first host runs the slice's chain again. The test checks that
those candidates were generated a second time on the first host, that no reaper re-send was needed, and that
files and rows still match one to one. (A slice's later stage tasks go to a queue bound to the host that
generated it, which no other host serves: the second test kills a host holding those.)

The second test runs the second host with FARM_QC=worker, where its images wait in its own memory for its QC
worker, and kills it while that worker checks a slice: the reaper has to re-send, the first host generates
those candidates again, and the second host, back, runs what it left in its QC queue without effect.
"""

from __future__ import annotations

import base64
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

from farm.artifacts import read_recipe
from farm.broker import device_workers, qc_queue, queue_keys
from farm.celery_app import make_app
from farm.config import load_settings
from farm.embedded import redis_server_binary
from farm.stack import Proc, Stack
from tests import pgutil
from tests.faults.conftest import FaultFarm, manifest
from tests.netns import TcpForwarder, TcpRedis, VethNamespace

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pgutil.postgres_pass_only]

ITEMS, CANDIDATES = 8, 4
THROUGH = ("scored", "passed", "rejected")  # a candidate that went through every device stage

# Short timeouts so that recovery is observable within the test (as in the fault suite). The stall limit is
# longer than the visibility timeout plus kombu's restore sweep (10 s), so the slice b0 held comes back by
# itself before the reaper could act. One thread per worker: the two "hosts" share this machine's cores. The
# tiny model runs a slice in a fraction of a second, so one stage of every slice (generate in the first test,
# moderate in the second) takes FARM_FAULT_SLEEP_S on its first delivery (the farm's own fault hook, in the
# prompt): the batch lasts long enough for both hosts to serve it, and b0 can be caught in that stage.
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


def _running_slice(farm: HostFarm, worker: str, task: str) -> list[str]:
    """The candidates of the slice the worker named ``worker...`` is running as ``task`` (from its
    ``current``, ``farm.generate <first id> (+<more>) ...``), or none."""
    for w in farm.workers():
        if w.name.startswith(worker) and w.current and w.current.startswith(f"{task} "):
            first_id, more = w.current.split()[1:3]
            stem, index = first_id.rsplit("-", 1)
            return [f"{stem}-{int(index) + k:03d}" for k in range(int(more.strip("(+)")) + 1)]
    return []


def _taken(redis: TcpRedis, ids: list[str]) -> bool:
    """A worker has taken the message of the slice of ``ids`` and not acknowledged it."""
    for value in redis.client().hvals("unacked"):
        args = json.loads(base64.b64decode(json.loads(value)[0]["body"]))[0]
        if args and isinstance(args[0], dict) and args[0].get("candidates") == ids:
            return True
    return False


def _queued_slices(redis: TcpRedis, queue: str) -> list[list[str]]:
    """The candidates of each slice message waiting in ``queue``."""
    client = redis.client()
    raw = [m for key in queue_keys(queue) for m in client.lrange(key, 0, -1)]
    return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0]["candidates"] for m in raw]


def _join_second_host(h: TwoHosts, env: dict[str, str]) -> Proc:
    """The second host joins with one command: a worker for its own queue, pointed at the same services."""
    argv = h.ns.exec_argv([sys.executable, "-m", "farm", "worker", "--device", "b0"])
    return h.first.stack.spawn("worker-b0", argv, env)


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
    second = _join_second_host(h, h.second_env)
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

    prompts = [f"a lighthouse on a rock, study {i} [[fault:generate:sleep:*]]" for i in range(ITEMS)]
    batch_id = first.submit(manifest("two-hosts", prompts, candidates=CANDIDATES))

    # Once the second host has carried two slices through every stage, kill it while it runs the generate
    # task (slowed down) of another slice: its rows are not written yet. Its worker takes one message at a
    # time (prefetch 1, late acks) and runs the checks of a slice it generated before it takes the next
    # generate, so the one it holds is that slice's generate task, from a queue the first host serves too.
    def b0_slice() -> list[str]:
        return _running_slice(first, "b0@", "farm.generate")

    def b0_generating() -> bool:
        rows = {c.id: c for c in first.candidates(batch_id)}
        through = sum(c.device == "b0" and c.status in THROUGH for c in rows.values())
        ids = b0_slice()
        return (
            through >= 4
            and bool(ids)
            and all(rows[i].status == "pending" for i in ids)
            and _taken(h.redis, ids)
        )

    _wait(first, b0_generating, 120, "b0 to serve two slices and generate another")
    redis_clients = h.redis.client_addresses()
    stranded = b0_slice()
    os.killpg(second.popen.pid, signal.SIGKILL)
    second.popen.wait()
    killed_at = time.monotonic()
    rows = {c.id: c for c in first.candidates(batch_id)}
    assert stranded and all((rows[i].status, rows[i].image_path) == ("pending", None) for i in stranded)

    # The second host really was a host of its own: it reached Redis and PostgreSQL from its veth address.
    assert h.ns.peer_ip in redis_clients, redis_clients
    assert h.ns.peer_ip in h.postgres.peers, h.postgres.peers
    assert redis_clients <= {h.ns.host_ip, h.ns.peer_ip}, redis_clients

    # What b0's worker had taken goes back to the queue it came from after the visibility timeout, and the
    # first host, which serves that queue too, runs the slice again: no reaper is needed.
    assert first.wait(batch_id, timeout=180, supervise=False) == "done", _logs(stack)
    recovery_s = time.monotonic() - killed_at
    rows = first.assert_accounted_for(batch_id, ITEMS * CANDIDATES)
    assert {c.device for c in rows} == {"b0", "cuda0"}, {c.device for c in rows}
    by_id = {c.id: c for c in rows}
    for cid in stranded:
        c = by_id[cid]
        assert c.status in ("passed", "rejected"), (cid, c.status, c.error)
        assert c.device == "cuda0" and c.stage_attempts["generate"] == 2, (cid, c.device, c.stage_attempts)
    assert not [i.id for i in first.items(batch_id) if i.resends], "the reaper had nothing to re-send"

    # Every connection either service saw came from the two veth addresses.
    assert h.postgres.peers <= {h.ns.host_ip, h.ns.peer_ip}, h.postgres.peers
    assert h.redis.client_addresses() <= {h.ns.host_ip, h.ns.peer_ip}
    print(
        f"workers up in {ready_s:.0f}s; killed b0 holding {len(stranded)} candidates; the batch done "
        f"{recovery_s:.0f}s after the kill"
    )


def test_a_host_that_dies_while_its_qc_worker_holds_handed_off_images_loses_nothing(
    two_hosts: TwoHosts, tmp_path: Path
):
    """FARM_QC=worker on the second host: its device hands each slice's images off in its own memory (the
    handoff folder, which the first host cannot read) to its QC worker. The host dies while that worker checks
    a slice, and the stage tasks its device sent there (farm.moderate, then farm.validate and farm.score) are
    left in a queue bound to it (``qc-b0@host``) that nobody else serves. The reaper finds the items stalled
    and re-sends them; the first host finds the images lost and generates them again. When the second host
    comes back, the stale stage tasks it left behind run and change nothing, and its handoff folder ends
    empty."""
    h, first = two_hosts, two_hosts.first
    stack = first.stack
    handoff = tmp_path / "second-handoff"
    second_env = {**h.second_env, "FARM_QC": "worker", "FARM_HANDOFF_DIR": str(handoff)}
    qc = qc_queue("b0")

    def second_host_up() -> bool:
        replies = first.app.control.ping(timeout=1) or []
        return qc in {name for reply in replies for name in reply} and bool(
            device_workers(first.app, "b0", 1)
        )

    stack.start_worker("cuda0")
    stack.start_control()
    second = _join_second_host(h, second_env)
    _wait(
        first, lambda: device_workers(first.app, "cuda0", timeout=1) and second_host_up(), 180, "both hosts"
    )

    prompts = [f"a harbour crane at dusk, study {i} [[fault:moderate:sleep:*]]" for i in range(ITEMS)]
    batch_id = first.submit(manifest("two-hosts-qc", prompts, candidates=CANDIDATES))

    def qc_checking() -> bool:
        """b0's QC worker holds a slice (unacknowledged) whose images exist only in b0's handoff folder,
        after b0 has carried at least one slice through every stage."""
        rows = {c.id: c for c in first.candidates(batch_id)}
        through = sum(c.device == "b0" and c.status in THROUGH for c in rows.values())
        ids = _running_slice(first, qc, "farm.moderate")
        return (
            through >= 2
            and bool(ids)
            and all(rows[i].status == "generated" for i in ids)
            and all((handoff / f"{i}.npy").exists() for i in ids)
            and _taken(h.redis, ids)
        )

    _wait(first, qc_checking, 120, "b0's QC worker to check a slice")
    held = _running_slice(first, qc, "farm.moderate")
    os.killpg(second.popen.pid, signal.SIGKILL)
    second.popen.wait()
    stranded = sorted(
        c.id for c in first.candidates(batch_id) if c.status == "generated" and c.device == "b0"
    )
    assert set(held) <= set(stranded), (held, stranded)
    assert {f"{i}.npy" for i in stranded} <= {p.name for p in handoff.iterdir()}
    assert not [i for i in stranded if (first.settings.artifacts_dir / batch_id / f"{i}.png").exists()]

    assert first.wait(batch_id, timeout=300, supervise=False) == "done", _logs(stack)
    rows = first.assert_accounted_for(batch_id, ITEMS * CANDIDATES)
    by_id = {c.id: c for c in rows}
    for cid in stranded:
        c = by_id[cid]
        assert c.status in ("passed", "rejected"), (cid, c.status, c.error)
        # Generated again on the first host (whose worker took b0's place): its farm.moderate found the image
        # lost and replaced itself with generate and moderate, a delivery of generate that counts a second
        # attempt; moderate starts over with the new image.
        assert c.device == "cuda0" and c.worker.startswith("cuda0@"), (cid, c.device, c.worker)
        assert (c.stage_attempts["generate"], c.stage_attempts["moderate"]) == (2, 1), (cid, c.stage_attempts)
        assert read_recipe(first.settings.artifacts_dir / c.image_path)["seed"] == c.seed
    # Re-sent by the reaper: by its stall path (counted in item.resends) for a slice queued for b0's QC
    # worker, which holds no lease, or by its lease path (not counted there) for the slice b0's QC worker
    # held, whose lease ran out; the new holder's lease generation is past the one generate took.
    resent = {it.id for it in first.items(batch_id) if it.resends}
    taken_over = {by_id[i].item_id for i in stranded if by_id[i].lease_token > 1}
    assert {by_id[i].item_id for i in stranded} <= resent | taken_over, "the reaper re-sent the stalled items"
    assert {p.name for p in handoff.iterdir()} >= {f"{i}.npy" for i in stranded}, "read by nobody meanwhile"

    # What b0's QC worker held went back, after the visibility timeout, to the queue bound to b0's host: no
    # other worker serves it. The second host comes back with it: its QC worker runs the stale farm.moderate
    # (and the validate and score chained after it), finds every candidate past its stages and drops the
    # handoff (files of candidates finished elsewhere go with the sweep); the rank a stale message's chord may
    # fire again changes nothing. No row moves.
    stale = _queued_slices(h.redis, qc)
    assert held in stale, (held, stale)

    def snapshot() -> list[tuple]:
        cands = [
            (c.id, c.status, c.score, c.rank, c.is_winner, c.image_path, c.stage_attempts)
            for c in first.candidates(batch_id)
        ]
        items = [(it.id, it.status, it.winners, it.resends) for it in first.items(batch_id)]
        return [*cands, *items, first.batch(batch_id).status]

    before = snapshot()
    _join_second_host(h, second_env)
    _wait(first, second_host_up, 180, "the second host to come back")

    def stale_done() -> bool:
        busy = [w for w in first.workers() if w.name == qc and w.current]
        return (
            not _queued_slices(h.redis, qc)
            and not any(_taken(h.redis, ids) for ids in stale)
            and not busy
            and not any(p.suffix == ".npy" for p in handoff.iterdir())
        )

    _wait(first, stale_done, 120, "the second host to run its stale stage tasks and empty its handoff folder")
    assert snapshot() == before
