"""What the upload page and the API do through farm.dispatch and farm.actions: take a manifest from a request,
preview it, submit it, cancel, retry or resume a batch; broker trouble is turned into one exception the views
can show."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge

from farm import actions as farm_actions
from farm import dispatch
from farm.actions import ActionRefused, NoSuchBatch
from farm.assets import MAX_UPLOADED_FILES, AssetPolicy, UploadRefused, check_upload_name
from farm.config import Settings
from farm.manifest import ManifestError

YAML_TYPES = ("text/yaml", "application/x-yaml", "application/yaml", "text/x-yaml", "text/plain")
#: The multipart field (repeated) of the files sent beside a manifest, on the API and the upload page.
FILES_FIELD = "files"


class BrokerUnavailable(RuntimeError):
    """The broker did not take a message (a new batch's rows are removed again by farm.dispatch.submit)."""


@dataclass(frozen=True)
class Problem:
    path: str | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "message": self.message}


def too_large(settings: Settings, size: int) -> RequestEntityTooLarge:
    return RequestEntityTooLarge(
        description=f"The manifest is {size} bytes; the limit is {settings.max_upload_bytes} bytes "
        "(FARM_MAX_UPLOAD_BYTES). Split the batch or raise the limit."
    )


def check_size(settings: Settings, data: bytes) -> bytes:
    if len(data) > settings.max_upload_bytes:
        raise too_large(settings, len(data))
    return data


def from_api_request(request: Request, settings: Settings) -> bytes | None:
    """The manifest bytes of an API request: a YAML body, or the multipart field ``manifest``."""
    mimetype = request.mimetype or ""
    if mimetype.startswith("multipart/form-data") or mimetype == "application/x-www-form-urlencoded":
        upload = request.files.get("manifest")
        if upload is not None:
            return check_size(settings, upload.read(settings.max_upload_bytes + 1))
        text = request.form.get("manifest")
        return None if text is None else check_size(settings, text.encode("utf-8"))
    if mimetype in YAML_TYPES or not mimetype:
        data = request.get_data(cache=False)
        return check_size(settings, data) if data else None
    return None


def from_form(request: Request, settings: Settings) -> bytes | None:
    """The manifest of the upload page: the file if one was chosen, else the pasted text."""
    upload = request.files.get("manifest_file")
    if upload is not None and upload.filename:
        return check_size(settings, upload.read(settings.max_upload_bytes + 1))
    text = request.form.get("manifest_text", "")
    return check_size(settings, text.encode("utf-8")) if text.strip() else None


def upload_limit(settings: Settings) -> int:
    """Largest multipart request that may carry a manifest and its files (each checked on its own after)."""
    return settings.max_upload_bytes + MAX_UPLOADED_FILES * settings.max_asset_bytes


def uploads_from(request: Request, settings: Settings) -> dict[str, bytes]:
    """The files sent beside the manifest (multipart field ``files``, repeated), by file name.

    Raises ManifestError (path ``uploads``) for a name that is not a plain file name or is sent twice, and
    RequestEntityTooLarge for a file over FARM_MAX_ASSET_BYTES. Nothing is written here: the files are
    stored only once the manifest that names them is valid (farm.dispatch.submit).
    """
    files: dict[str, bytes] = {}
    for upload in request.files.getlist(FILES_FIELD):
        if not upload.filename:
            continue  # a file input left empty
        try:
            name = check_upload_name(upload.filename)
        except UploadRefused as exc:
            raise ManifestError.at("uploads", str(exc)) from None
        if name in files:
            raise ManifestError.at("uploads", f"two uploaded files are named {name!r}; rename one")
        data = upload.read(settings.max_asset_bytes + 1)
        if len(data) > settings.max_asset_bytes:
            raise RequestEntityTooLarge(
                description=f"The uploaded file {name!r} is larger than the limit of "
                f"{settings.max_asset_bytes} bytes for a file sent with a manifest (FARM_MAX_ASSET_BYTES)."
            )
        files[name] = data
    return files


def asset_policy(settings: Settings, uploads: dict[str, bytes] | None = None) -> AssetPolicy:
    """What a manifest from the web may read: the files uploaded with it and files in FARM_ASSET_DIRS."""
    try:
        return AssetPolicy.uploaded(asset_dirs=settings.asset_dirs, uploads=uploads)
    except UploadRefused as exc:
        raise ManifestError.at("uploads", str(exc)) from None


def problems(exc: ManifestError) -> list[Problem]:
    return [Problem(e.path, e.message) for e in exc.errors]


def preview(data: bytes, settings: Settings, uploads: dict[str, bytes] | None = None) -> dict[str, Any]:
    """The dry run: counts of what the manifest expands to. Raises ManifestError."""
    return dispatch.dry_run(data, settings=settings, assets=asset_policy(settings, uploads))


def submit(data: bytes, settings: Settings, uploads: dict[str, bytes] | None = None) -> dispatch.Submitted:
    """Write the batch (and store the files uploaded with it) and hand it to the control queue. Raises
    ManifestError or BrokerUnavailable; either way nothing is kept."""
    try:
        return dispatch.submit(data, settings=settings, assets=asset_policy(settings, uploads))
    except ManifestError:
        raise
    except Exception as exc:  # kombu/redis connection errors come in many classes; all mean the same here
        if _is_broker_error(exc):
            raise BrokerUnavailable(
                f"the broker did not accept the batch ({type(exc).__name__}: {exc}); nothing was kept, "
                "try again when the broker is up"
            ) from exc
        raise


def cancel(batch_id: str, settings: Settings) -> bool:
    """Cancel the batch (farm.dispatch.cancel); True if it was queued or running. Raises BrokerUnavailable."""
    try:
        return dispatch.cancel(batch_id, settings=settings)
    except Exception as exc:
        if _is_broker_error(exc):
            raise BrokerUnavailable(
                "the batch is marked cancelled and no new work will start, but the broker did not take the "
                f"messages that close its unsent items ({type(exc).__name__}: {exc}), so it may not show as "
                "finished"
            ) from exc
        raise


def retry_failed(batch_id: str, settings: Settings) -> int:
    """Reset a done batch's failed candidates and send them again; returns how many.

    Raises NoSuchBatch, ActionRefused or BrokerUnavailable.
    """
    try:
        return farm_actions.retry_failed(batch_id, settings=settings)
    except (ActionRefused, NoSuchBatch):
        raise
    except Exception as exc:
        if _is_broker_error(exc):
            raise BrokerUnavailable(
                "the failed candidates are marked for retry, but the broker did not take their messages "
                f"({type(exc).__name__}: {exc}); press Resume when the broker is up"
            ) from exc
        raise


def resume(batch_id: str, settings: Settings) -> int:
    """Re-send what an interrupted batch still needs; returns the number of messages sent.

    Raises NoSuchBatch, ActionRefused or BrokerUnavailable.
    """
    try:
        return farm_actions.resume(batch_id, settings=settings)
    except (ActionRefused, NoSuchBatch):
        raise
    except Exception as exc:
        if _is_broker_error(exc):
            raise BrokerUnavailable(
                f"the broker did not take the messages ({type(exc).__name__}: {exc}); nothing changed, try "
                "again when the broker is up"
            ) from exc
        raise


def _is_broker_error(exc: BaseException) -> bool:
    """True if ``exc`` or anything in its cause chain is a broker connection error.

    Celery reports an unreachable Redis in several shapes (kombu OperationalError, redis ConnectionError, or a
    RuntimeError from the result consumer raised *from* the redis error), so the whole chain is looked at.
    """
    from kombu.exceptions import KombuError
    from redis.exceptions import RedisError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, (KombuError, RedisError, ConnectionError, OSError)):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
