"""What a worker process holds for its whole life: its pinning, its settings, and three parts with one job
each: ``Models`` (what it has loaded), ``Images`` (a slice's images between its stages, and the QC handoff)
and ``Heartbeat`` (its row in the ``workers`` table). ``Runtime`` composes them with the lease of the task
it runs (farm.tasks.lease); a task's entry point fetches it with ``runtime()`` and passes it down.

Models are loaded once per process, in ``worker_process_init`` (the child, after the fork: no CUDA context
is ever created in the prefork parent), and kept in a registry that counts loads. The registry and what the
worker is doing are written to the ``workers`` table, which is what `farm workers` and the dashboard read.
farm.ml is imported lazily so the control worker, which ranks from SQL, never loads torch.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from celery.signals import after_setup_logger, after_setup_task_logger, worker_process_init
from sqlalchemy import Connection, bindparam, update
from sqlalchemy.dialects import postgresql, sqlite

from farm.artifacts import Handoff, store_for
from farm.broker import announce_models, local_queue, qc_queue
from farm.config import Settings, load_settings
from farm.db import Worker, get_engine, utcnow
from farm.gpu_pinning.pinning import limit_torch_threads, pinned, pinned_role
from farm.placement import generator_key, generator_queues

if TYPE_CHECKING:
    from farm.ml.moderation import HashIndex
    from farm.records import Claim
    from farm.tasks.lease import Lease

log = logging.getLogger(__name__)

IMAGE_CACHE = 64
DEFAULT_PRELOAD = {"validator": "tiny-clip", "scorer": "tiny-aesthetic"}


class Models:
    """The models a worker process has loaded, in a registry that counts loads and evicts generators.

    Its own part because loading is what a stage asks of the process most, and what the heartbeat reports:
    each loader builds on first use and hands back the registry's copy after. Generator loads and evictions
    change which model queues the worker should consume, so they are announced to its main process.
    """

    def __init__(self, settings: Settings, device: str, *, store: Any, announce_as: str | None) -> None:
        from farm.ml.registry import ModelRegistry

        self.settings = settings
        self.device = device
        self.store = store
        #: The worker told which model queues to consume (``announce``): None for a QC or unpinned process.
        self.announce_as = announce_as
        self.registry = ModelRegistry(budget_bytes=_budget_bytes(device))
        pinned_threads = os.environ.get("FARM_PINNED_THREADS")
        self.threads = int(pinned_threads) if pinned_threads else None
        self._announced: list[str] | None = None

    def _resolve(self, ref: str, kind: str) -> Any:
        from farm.ml.builds import build_and_resolve

        return build_and_resolve(ref, kind=kind, models_dir=self.settings.models_dir)

    def generator(self, ref: str, *, dtype: str = "fp32", memory: dict | None = None) -> Any:
        from farm.ml.generator import Generator

        memory = memory or {}
        gen = self.registry.get(
            generator_key(ref, dtype=dtype, memory=memory),
            lambda: Generator.load(
                self._resolve(ref, "generator"),
                device=self.device,
                dtype=dtype,
                attention_slicing=bool(memory.get("attention_slicing")),
                cpu_offload=bool(memory.get("cpu_offload")),
            ),
            evictable=True,
        )
        self.announce()
        return gen

    def announce(self) -> None:
        """Tell this worker's main process which model queues to consume: those of the generators held now.

        Sent only when the set changed since the last announcement (a load or an eviction), as a remote
        control message to this worker alone; the main process also reads ``loaded`` from the heartbeat
        when idle, so a lost message is corrected (farm.worker.ModelQueues).
        """
        if self.announce_as is None:
            return
        queues = sorted(generator_queues(self.registry.loaded()))
        if queues == self._announced:
            return
        from farm.celery_app import app

        try:
            announce_models(app, self.announce_as, queues)
        except Exception as exc:  # the broker is away: the next load, or the idle re-read, catches up
            log.warning("could not tell %s its model queues %s: %s", self.announce_as, queues, exc)
            return
        self._announced = queues

    def validator(self, ref: str) -> Any:
        from farm.ml.validation import ClipAlignment

        return self.registry.get(
            f"validator:{ref}",
            lambda: ClipAlignment.load(self._resolve(ref, "validator"), device=self.device),
        )

    def scorer(self, ref: str) -> Any:
        from farm.ml.scoring import load_scorer

        return self.registry.get(
            f"scorer:{ref}", lambda: load_scorer(self._resolve(ref, "scorer"), device=self.device)
        )

    def nudenet(self) -> Any:
        from farm.ml.moderation import NudeNetLayer

        return self.registry.get("moderation:nudenet", lambda: NudeNetLayer(threads=self.threads))

    def opennsfw(self) -> Any:
        from farm.ml.moderation import OpenNsfwLayer

        return self.registry.get("moderation:opennsfw", lambda: OpenNsfwLayer(threads=self.threads))

    def blocklist(self, path: str) -> HashIndex:
        from farm.ml.moderation import HashIndex, load_blocklist

        return self.registry.get(
            f"blocklist:{path}", lambda: HashIndex.of(load_blocklist(path, store=self.store))
        )


class Images:
    """A slice's images between its stage tasks: kept in memory, their PNG writes in flight, the QC handoff.

    Its own part because images never travel through the broker: the stage tasks of a slice run in one
    process (the device worker's one pool child, or its QC worker's) and pass images through it, across
    processes through the host's handoff folder, and from the store where neither has them. Generate
    remembers or hands off what it made, moderate takes handed-off images and starts their PNG writes, and
    ``settle_writes`` waits for those before a row names the file.
    """

    def __init__(self, store: Any, *, handoff: Handoff | None, qc: bool, hands_off: bool) -> None:
        self.store = store
        self.handoff = handoff
        self.cache: OrderedDict[str, Any] = OrderedDict()
        self.pending_writes: dict[str, Future[None]] = {}
        self._qc = qc
        self._hands_off = hands_off
        #: Whether generate hands the slice's images off to the QC worker (see ``checks_here``).
        self.handing_off = hands_off

    def remember(self, rel: str, image: Any) -> None:
        """Keep a slice's images in memory for its later stages, which run in this same process."""
        self.cache[rel] = image
        self.cache.move_to_end(rel)
        while len(self.cache) > IMAGE_CACHE:
            self.cache.popitem(last=False)

    def image(self, rel: str) -> Any:
        """The image at ``rel`` in the artifact store, from memory when this process made it."""
        cached = self.cache.get(rel)
        if cached is not None:
            return cached
        return self.store.open_image(rel)

    def take_handoff(self, c: Any) -> Any:
        """QC worker: candidate ``c``'s image as its generating worker handed it off, with its PNG write
        started (``settle_writes`` waits for it before the row moves on); None where there is no handoff."""
        if self.handoff is None or not self._qc:
            return None
        if c.id in self.pending_writes:
            return self.cache.get(c.image_path)
        image = self.handoff.open(c.image_path)
        if image is None:
            return None
        self.remember(c.image_path, image)
        self.pending_writes[c.id] = self.store.start_pngs([(c.image_path, image, c.recipe)])[0]
        return image

    @contextmanager
    def checks_here(self) -> Iterator[None]:
        """A slice checked by this generating worker while its QC worker is away (farm.tasks.chain): generate
        stores the PNGs itself, and the checking models load here on first use."""
        self.handing_off = False
        try:
            yield
        finally:
            self.handing_off = self._hands_off

    def drop_handoff(self, candidate_ids: list[str]) -> None:
        """After moderate: the slice's handed-off images are stored or no longer wanted (a no-op where
        nothing is handed off)."""
        if self.handoff is not None:
            self.handoff.drop(candidate_ids)


class Heartbeat:
    """This worker's row in the ``workers`` table: what `farm workers`, the dashboard and placement read.

    Its own part because it is written from three places, each at no extra commit where it can be: inside
    the delivery count's transaction (``busy``), the last stage write's (``idle``) and each lease renewal's
    (``alive``, from the renewing thread); a slice that generates for more than a second also writes its
    denoising step (``progress``), once a second.
    """

    def __init__(self, settings: Settings, *, name: str, queue: str, device: str, models: Models) -> None:
        self.settings = settings
        self.name = name
        self.queue = queue
        self.device = device
        self.models = models
        self.tasks_done = 0
        self._upsert: Any = None

    def _values(self) -> dict[str, Any]:
        registry = self.models.registry
        return {
            "name": self.name,
            "queue": self.queue,
            "device": self.device,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "models": registry.loads(),
            "loaded": registry.loaded(),
            "tasks_done": self.tasks_done,
            "heartbeat_at": utcnow(),
            # Per-step progress is the slice in flight's (``progress``): a task's start and end clear it.
            "step": None,
            "steps": None,
        }

    def busy(self, current: str | None) -> Callable[[Connection], object]:
        """The heartbeat at the start of a task: upsert this worker's row (loaded models with load counts,
        what it runs now). Stages write it inside their own transactions, so it costs no commit of its own;
        the statement is built once per process."""
        if self._upsert is None:
            dialect = (
                postgresql if get_engine(self.settings.database_url).dialect.name == "postgresql" else sqlite
            )
            stmt = dialect.insert(Worker)
            keep = {k: stmt.excluded[k] for k in (*self._values(), "current") if k != "name"}
            self._upsert = stmt.on_conflict_do_update(index_elements=["name"], set_=keep)
        values = {**self._values(), "current": current, "started_at": utcnow()}
        upsert = self._upsert
        return lambda conn: conn.execute(upsert, values)

    def idle(self) -> Callable[[Connection], object]:
        """The heartbeat at the end of a task: nothing running, one more task done (the row exists)."""
        values = {**self._values(), "current": None}
        values["w_name"] = values.pop("name")
        return lambda conn: conn.execute(_IDLE, values)

    def alive(self) -> Callable[[Connection], object]:
        """The heartbeat a lease renewal writes beside it: this worker's row, from the process that works."""
        values = {"w_name": self.name, "heartbeat_at": utcnow()}
        return lambda conn: conn.execute(_IDLE, values)

    def progress(self, step: int, steps: int) -> None:
        """Write how far the slice this process generates has denoised (step ``step`` of ``steps``) to its
        row, with the heartbeat, in a transaction of its own. Called from the denoising loop at most once a
        second (farm.tasks.interrupt), so `farm workers` and the dashboard show a long slice moving; a
        failed write is logged and the slice goes on (the progress is for people; the stage write counts)."""
        values = {"w_name": self.name, "step": step, "steps": steps, "heartbeat_at": utcnow()}
        try:
            with get_engine(self.settings.database_url).begin() as conn:
                conn.execute(_IDLE, values)
        except Exception as exc:
            log.warning("could not write the progress of %s (step %d of %d): %s", self.name, step, steps, exc)

    def write(self, current: str | None = None) -> None:
        """Write the heartbeat in a transaction of its own (at start, and where no stage write happens)."""
        with get_engine(self.settings.database_url).begin() as conn:
            self.busy(current)(conn)


class Runtime:
    """What a device worker process is (pinning, role, name) and the parts it holds for its whole life:
    ``models``, ``images``, ``heartbeat``, and the ``lease`` of the task it runs.

    One per process, built by ``runtime()`` at a task's entry (or in ``worker_process_init``) and passed
    down to the stages explicitly. A device worker sends the checks of the slices it generates to its own
    queue (``local_queue``, ``cuda0@host``). With FARM_QC=worker a device has two workers on its host: the
    generating one, which holds only generators, hands each slice's images off in shared memory and sends
    its checks to ``qc_queue``; and the QC worker (role ``qc``, ``qc-cuda0@host``), which holds the checking
    models, stores the PNGs and runs the checks while the first generates the next slice.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.queue, self.device = pinned()
        self.role = pinned_role()
        split = settings.qc == "worker" and bool(self.queue)
        host = socket.gethostname()
        self.name = qc_queue(self.queue, host) if self.role == "qc" else f"{self.queue or 'local'}@{host}"
        self.qc_queue = qc_queue(self.queue) if split and self.role != "qc" else None
        #: Where this device worker sends the checks of a slice it keeps (farm.tasks.chain): its own queue.
        self.local_queue = local_queue(self.queue, host) if self.queue and self.role != "qc" else None
        self.store = store_for(settings)
        announce_as = self.name if self.queue and self.role != "qc" else None
        self.models = Models(settings, self.device, store=self.store, announce_as=announce_as)
        self.images = Images(
            self.store,
            handoff=Handoff(settings.handoff_dir) if split else None,
            qc=self.role == "qc",
            hands_off=self.qc_queue is not None,
        )
        self.heartbeat = Heartbeat(
            settings, name=self.name, queue=self.queue, device=self.device, models=self.models
        )
        self.hashes: dict[str, tuple[HashIndex, Any]] = {}
        #: The lease the task running in this process holds (farm.tasks.lease), renewed by ``renewer``.
        self.lease: Lease | None = None
        self.renewer: threading.Thread | None = None

    def batch_hashes(self, conn: Connection, batch_id: str) -> HashIndex:
        """The batch's PDQ hashes so far: kept in this process, topped up with the rows changed since (read on
        ``conn``, the stage's write transaction, which sees its own)."""
        from farm.ml.moderation import HashIndex
        from farm.records import batch_hashes

        known, since = self.hashes.get(batch_id) or (HashIndex(), None)
        fresh, newest = batch_hashes(conn, batch_id, since=since)
        known.update(fresh.items())
        self.hashes = {batch_id: (known, newest)}  # one batch at a time is what a worker works on
        return known

    def preload(self) -> None:
        """Load what every slice needs before the first task arrives."""
        from farm import faults

        faults.slow_load()
        if self.role != "qc":
            self.models.generator(self.settings.preload_generator, dtype=self.settings.preload_dtype)
        if self.qc_queue:
            return
        self.models.validator(DEFAULT_PRELOAD["validator"])
        self.models.scorer(DEFAULT_PRELOAD["scorer"])
        self.models.nudenet()
        self.models.opennsfw()

    def claim(self) -> Claim:
        """This process's claim on a slice's lease (taken by ``records.begin_stages``)."""
        from farm.records import Claim
        from farm.tasks.lease import gone, owner_name

        return Claim(owner=owner_name(self.name), seconds=self.settings.lease_seconds, gone=gone)


_IDLE = update(Worker.__table__).where(Worker.__table__.c.name == bindparam("w_name"))


def _budget_bytes(device: str) -> int | None:
    """Generator memory budget: FARM_MODEL_BUDGET_MB, else 90% of the device's free memory on CUDA."""
    settings = load_settings()
    if settings.model_budget_mb:
        return settings.model_budget_mb * 2**20
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free * 0.9)
    return None


_runtime: Runtime | None = None


def runtime() -> Runtime:
    """This process's runtime, built on first use. Only task entry points and worker signal handlers call
    it; everything below them is handed the runtime."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(load_settings())
    return _runtime


@after_setup_logger.connect
@after_setup_task_logger.connect
def _structured_logs(logger: logging.Logger | None = None, **_kwargs: Any) -> None:
    from farm import logs

    if logger is not None:
        logs.install(logger, load_settings().log_format)


@worker_process_init.connect
def _on_process_init(**_kwargs: Any) -> None:
    if not os.environ.get("FARM_PINNED_QUEUE"):
        return
    limit_torch_threads()
    rt = runtime()
    rt.preload()
    rt.heartbeat.write()
    rt.models.announce()  # a restarted child holds only what it preloaded
    log.info("worker %s on %s loaded %s", rt.name, rt.device, rt.models.registry.loads())


def describe_task(name: str, payload: Any) -> str:
    """``farm.generate <first candidate id> (+N)``: what a worker is busy with (`farm workers`, tests)."""
    ids = (payload.get("candidates") if isinstance(payload, dict) else None) or []
    return f"{name} {ids[0]} (+{len(ids) - 1})" if ids else name
