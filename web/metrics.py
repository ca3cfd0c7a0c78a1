"""Prometheus metrics of the farm, read from SQL (and the broker's queue lengths) at scrape time.

A custom collector on a registry of its own, so nothing is counted in this process and every replica of the
web app reports the same figures. What it exposes:

- ``farm_candidates{status}``, ``farm_batches{status}``: rows by status (gauges).
- ``farm_stage_duration_seconds{stage,queue,quantile}`` (0.5, 0.9, 0.99), ``farm_stage_duration_mean_seconds``
  and ``farm_stage_duration_samples``: per-stage time per candidate, from the ``timings`` of the most recently
  updated STAGE_WINDOW candidates. They describe a sliding window, so they are gauges, not a histogram's
  counters: graph them as they are, never ``rate()`` them.
- ``farm_queue_length{queue}``: messages waiting in Redis for the shared ``slices`` queue, ``control``, the
  model queue of each open batch (farm.placement) and each device queue (configured or seen in the workers
  table); ``farm_broker_up`` is 0 when Redis did not answer.
- ``farm_workers_live`` (and ``farm_workers_live_by_queue{queue}``): workers whose heartbeat is younger than
  WORKER_LIVE_SECONDS.
- ``farm_candidates_finished_last_minute``: candidates that reached a final status in the last 60 s.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from farm.broker import CONTROL_QUEUE, QC_PREFIX, SLICES_QUEUE, queue_lengths
from farm.config import Settings
from farm.db import Batch, Candidate, Worker, session_scope, utcnow
from farm.placement import active_model_queues
from farm.states import CANDIDATE_FINAL, BatchStatus, CandidateStatus

STAGE_WINDOW = 5000
QUANTILES = (0.5, 0.9, 0.99)
WORKER_LIVE_SECONDS = 60
THROUGHPUT_SECONDS = 60


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list (not empty)."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def stage_durations(s: Any, *, window: int = STAGE_WINDOW) -> dict[tuple[str, str], list[float]]:
    """Seconds per candidate by (stage, queue), from the ``timings`` of the ``window`` candidates updated
    last."""
    rows = s.scalars(
        select(Candidate.timings).order_by(Candidate.updated_at.desc()).limit(window)
    ).all()
    out: dict[tuple[str, str], list[float]] = {}
    for timings in rows:
        for stage, t in (timings or {}).items():
            if not isinstance(t, dict) or not isinstance(t.get("s"), int | float):
                continue
            out.setdefault((str(stage), str(t.get("queue") or "")), []).append(float(t["s"]))
    return out


def queue_depths(settings: Settings, queues: list[str]) -> dict[str, int] | None:
    """LLEN of each queue's Redis lists on the broker farm.dispatch sends to; None if the broker is down."""
    from farm import dispatch

    try:
        with dispatch.app_for(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=3)
            return queue_lengths(conn.default_channel.client, queues)
    except Exception:  # kombu and redis raise many classes for "not reachable"; all mean the same here
        return None


class FarmCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = utcnow()
        with session_scope(self.settings.database_url) as s:
            cand_counts = dict(s.execute(
                select(Candidate.status, func.count()).group_by(Candidate.status)).all())
            batch_counts = dict(s.execute(select(Batch.status, func.count()).group_by(Batch.status)).all())
            durations = stage_durations(s)
            workers = s.execute(select(Worker.name, Worker.queue, Worker.heartbeat_at)).all()
            finished = s.scalar(
                select(func.count()).select_from(Candidate).where(
                    Candidate.status.in_(CANDIDATE_FINAL),
                    Candidate.updated_at >= now - timedelta(seconds=THROUGHPUT_SECONDS),
                )
            ) or 0

        g = GaugeMetricFamily("farm_candidates", "Candidates by status.", labels=["status"])
        for status in sorted({*cand_counts, CandidateStatus.PENDING, *CANDIDATE_FINAL}):
            g.add_metric([status], cand_counts.get(status, 0))
        yield g
        g = GaugeMetricFamily("farm_batches", "Batches by status.", labels=["status"])
        for status in sorted({*batch_counts, *BatchStatus}):
            g.add_metric([status], batch_counts.get(status, 0))
        yield g

        window = f"over the last {STAGE_WINDOW} updated candidates"
        q = GaugeMetricFamily("farm_stage_duration_seconds",
                              f"Seconds per candidate in a stage, quantiles {window}.",
                              labels=["stage", "queue", "quantile"])
        mean = GaugeMetricFamily("farm_stage_duration_mean_seconds",
                                 f"Mean seconds per candidate in a stage {window}.",
                                 labels=["stage", "queue"])
        n = GaugeMetricFamily("farm_stage_duration_samples",
                              f"Candidates timed in a stage {window}.", labels=["stage", "queue"])
        for (stage, queue), values in sorted(durations.items()):
            values.sort()
            for quant in QUANTILES:
                q.add_metric([stage, queue, str(quant)], quantile(values, quant))
            mean.add_metric([stage, queue], sum(values) / len(values))
            n.add_metric([stage, queue], len(values))
        yield q
        yield mean
        yield n

        device_queues = {queue for _, queue, _ in workers}
        # A QC worker (FARM_QC=worker) is named after its queue: how many slices wait for its checks.
        qc_queues = {name for name, _, _ in workers if name.startswith(QC_PREFIX)}
        models = active_model_queues(self.settings.database_url)
        queues = sorted(
            {SLICES_QUEUE, CONTROL_QUEUE, *self.settings.devices, *device_queues, *models, *qc_queues}
        )
        depths = queue_depths(self.settings, queues)
        up = GaugeMetricFamily("farm_broker_up", "1 if the broker answered this scrape, else 0.")
        up.add_metric([], 0 if depths is None else 1)
        yield up
        g = GaugeMetricFamily("farm_queue_length", "Messages waiting in a Celery queue (all priorities).",
                              labels=["queue"])
        for queue, depth in sorted((depths or {}).items()):
            g.add_metric([queue], depth)
        yield g

        cutoff = now - timedelta(seconds=WORKER_LIVE_SECONDS)
        live: dict[str, int] = {queue: 0 for queue in sorted(device_queues)}
        for _, queue, heartbeat in workers:
            if heartbeat is not None and heartbeat >= cutoff:
                live[queue] += 1
        g = GaugeMetricFamily("farm_workers_live",
                              f"Workers with a heartbeat in the last {WORKER_LIVE_SECONDS} s.")
        g.add_metric([], sum(live.values()))
        yield g
        g = GaugeMetricFamily("farm_workers_live_by_queue",
                              f"Workers with a heartbeat in the last {WORKER_LIVE_SECONDS} s, by the queue "
                              "they serve.", labels=["queue"])
        for queue, count in live.items():
            g.add_metric([queue], count)
        yield g
        g = GaugeMetricFamily("farm_candidates_finished_last_minute",
                              f"Candidates that reached a final status in the last {THROUGHPUT_SECONDS} s.")
        g.add_metric([], finished)
        yield g


def render(settings: Settings) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(settings))
    return generate_latest(registry)
