"""/healthz and /metrics: no token needed, real SQL, a real Redis for the queue lengths."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from farm.db import Candidate, session_scope, utcnow
from web.metrics import quantile

TOKEN = "s3cret-token"
DB_DOWN = "postgresql+psycopg2://farm@127.0.0.1:1/farm"  # nothing listens on port 1


def _samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return _samples(r.get_data(as_text=True))


# -- healthz -------------------------------------------------------------------------------------------------


def test_healthz_ok(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json == {"ok": True, "database": "ok"}


def test_healthz_is_503_when_the_database_does_not_answer(app):
    app.config["FARM_SETTINGS"] = dataclasses.replace(app.config["FARM_SETTINGS"], database_url=DB_DOWN)
    r = app.test_client().get("/healthz")
    assert r.status_code == 503
    assert r.json["ok"] is False and r.json["database"] == "error" and r.json["error"]


def test_healthz_and_metrics_need_no_token(make_app, monkeypatch):
    monkeypatch.setenv("FARM_WEB_TOKEN", TOKEN)
    client = make_app().test_client()
    assert client.get("/api/v1/batches").status_code == 401  # the rest is still locked
    assert client.get("/").status_code == 302
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


# -- metrics -------------------------------------------------------------------------------------------------


def test_quantile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert quantile(values, 0.5) == 50 and quantile(values, 0.9) == 90 and quantile(values, 0.99) == 99
    assert quantile([3.0], 0.99) == 3.0


def test_metrics_from_sql(client, settings, make_batch, make_worker, broker):
    make_batch("done")
    make_batch("running")
    make_worker("cuda0@a", queue="cuda0", age=5)
    make_worker("cuda1@a", queue="cuda1", age=5)
    make_worker("cuda1@old", queue="cuda1", age=600)
    make_worker("qc-cuda0@a", queue="cuda0", age=5)  # cuda0's QC worker (FARM_QC=worker), named as its queue
    # Three candidates (the winners of the three finished items) changed just now; the rest long ago.
    with session_scope(settings.database_url) as s:
        s.execute(update(Candidate).values(updated_at=utcnow() - timedelta(minutes=10)))
        s.execute(update(Candidate).where(Candidate.status == "passed", Candidate.index == 0)
                  .values(updated_at=utcnow()))
    broker.lpush("slices", b"{}", b"{}", b"{}")
    broker.lpush("cuda1:3", b"{}")
    broker.lpush("qc-cuda0@a", b"{}", b"{}")

    m = _scrape(client)
    assert m[("farm_candidates", (("status", "passed"),))] == 5  # 3 in the done batch, 2 in the running one
    assert m[("farm_candidates", (("status", "failed"),))] == 3
    assert m[("farm_candidates", (("status", "pending"),))] == 2
    assert m[("farm_candidates", (("status", "cancelled"),))] == 0
    assert m[("farm_batches", (("status", "done"),))] == 1
    assert m[("farm_batches", (("status", "running"),))] == 1
    assert m[("farm_candidates_finished_last_minute", ())] == 3
    assert m[("farm_workers_live", ())] == 3
    assert m[("farm_workers_live_by_queue", (("queue", "cuda0"),))] == 2
    assert m[("farm_workers_live_by_queue", (("queue", "cuda1"),))] == 1
    assert m[("farm_broker_up", ())] == 1
    assert m[("farm_queue_length", (("queue", "slices"),))] == 3
    assert m[("farm_queue_length", (("queue", "cuda1"),))] == 1
    assert m[("farm_queue_length", (("queue", "control"),))] == 0
    assert m[("farm_queue_length", (("queue", "qc-cuda0@a"),))] == 2
    # make_batch times generate at 0.25 s and moderate at 0.05 s on cuda0, for every candidate with an image.
    gen = (("queue", "cuda0"), ("stage", "generate"))
    p90 = tuple(sorted((*gen, ("quantile", "0.9"))))
    assert m[("farm_stage_duration_seconds", p90)] == pytest.approx(0.25)
    assert m[("farm_stage_duration_mean_seconds", gen)] == pytest.approx(0.25)
    assert m[("farm_stage_duration_samples", gen)] == 11  # 6 in the done batch, 5 in the running one
    assert m[("farm_stage_duration_mean_seconds", (("queue", "cuda0"), ("stage", "moderate")))] == \
        pytest.approx(0.05)


def test_metrics_still_answer_with_the_broker_down(client, make_batch, broker_down):
    make_batch("done")
    m = _scrape(client)
    assert m[("farm_broker_up", ())] == 0
    assert not [k for k in m if k[0] == "farm_queue_length"]
    assert m[("farm_candidates", (("status", "passed"),))] == 3


def test_metrics_of_an_empty_farm(client, broker):
    m = _scrape(client)
    assert m[("farm_candidates", (("status", "pending"),))] == 0
    assert m[("farm_workers_live", ())] == 0
    assert not [k for k in m if k[0] == "farm_stage_duration_seconds"]
