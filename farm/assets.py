"""Which files a manifest may make the farm read: the operator's, or an uploader's, and nothing else.

Why a policy object: a manifest names files (a PDQ blocklist, model folders; LoRA files, init images and face
galleries next), and whoever wrote it decides what the server opens. A manifest the operator runs with
``farm submit`` may name any file the operator can read: it is their machine. A manifest uploaded on the
dashboard or the API is not the operator. It may name only files uploaded together with it and files inside
the folders the operator lists in FARM_ASSET_DIRS; every other path is refused with one message that is the
same whether the path exists, is a file, a folder or a link, so an uploader learns nothing about the disk.
Every field of the manifest that names a file asks the ``AssetPolicy`` it was given (``read_file`` for a
file, ``find_folder`` for a folder), so a new field gets the same rule by asking the same object.

Uploaded files go to the artifact store under ``uploads/<submission>/<name>`` once the manifest is valid
(``AssetPolicy.stored``), and the batch records them as ``store:uploads/...``; workers read them through
the store (``read_asset``), so a worker on another host sees them wherever it sees the images: the shared
folder or the bucket.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FILE_REFUSED",
    "FOLDER_REFUSED",
    "MAX_UPLOADED_FILES",
    "STORE_PREFIX",
    "Asset",
    "AssetPolicy",
    "UploadRefused",
    "check_upload_name",
    "is_hub_id",
    "looks_like_path",
    "read_asset",
]

#: What a batch records for a file that lives in the artifact store (an uploaded file), before its name there.
STORE_PREFIX = "store:"
#: The store folder that holds uploaded files, one folder per submission.
UPLOADS_DIR = "uploads"
#: Most extra files one submission may upload beside its manifest.
MAX_UPLOADED_FILES = 16

FILE_REFUSED = (
    "files named by an uploaded manifest must be uploaded with it (name the file by its file name alone) "
    "or lie in a folder listed in FARM_ASSET_DIRS"
)
FOLDER_REFUSED = (
    "an uploaded manifest may name a preset, a hub id (owner/name) or a model folder inside a folder "
    "listed in FARM_ASSET_DIRS; other paths are refused"
)

_UPLOAD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

#: A Hugging Face hub id: ``owner/name``, each part 1 to 96 letters, digits, ``_``, ``.`` or ``-`` starting
#: with a letter or digit (the hub's own rule, which also forbids ``--`` and ``..`` anywhere: ``is_hub_id``).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def is_hub_id(value: str) -> bool:
    """Whether ``value`` is spelled as a hub id (``owner/name``), the way the hub itself validates one.

    Why here, once: manifest validation (farm.manifest) and the worker's resolution (farm.ml.presets) must
    agree on what a hub id is, or a reference one accepts the other treats as something else.
    """
    return _HUB_ID.fullmatch(value) is not None and ".." not in value and "--" not in value


def looks_like_path(value: str) -> bool:
    """Whether a model reference is spelled as a local path: absolute, starting with ``.`` or ``~``, holding a
    backslash, of three or more ``/`` parts, or with a ``..`` part (``./x``, ``~root``, ``a/b/c``, ``x/..``).

    Anything else (``owner/name``, a bare ``name``) is a preset or a hub id and is never looked up on the disk
    relative to a working folder. Why one rule: farm.manifest decides from it what an uploaded manifest may
    name, farm.ml.presets what a worker looks up on its disk; two copies had already drifted apart.
    """
    return (
        value.startswith(("/", ".", "~"))
        or "\\" in value
        or value.count("/") > 1
        or ".." in value.split("/")
    )


class UploadRefused(ValueError):
    """An uploaded file the farm will not take (its name, its size, too many files); the message says why."""


@dataclass(frozen=True)
class Asset:
    """A file a manifest names, read once at validation: ``ref`` is what the batch records and workers open
    (an absolute path, or ``store:uploads/...`` for an uploaded file), ``data`` its bytes."""

    ref: str
    data: bytes


def check_upload_name(name: str) -> str:
    """``name`` if it can be an uploaded file's name, else UploadRefused: a plain file name (no folder, not
    hidden), 1 to 128 of letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit."""
    if _UPLOAD_NAME.fullmatch(name) is None:
        raise UploadRefused(
            f"uploaded file name {name[:80]!r} is not allowed: use 1 to 128 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit (no folders, no hidden files)"
        )
    return name


@dataclass
class AssetPolicy:
    """What a manifest may read: ``trusted`` (the operator: any path), else ``uploads`` (file name -> bytes,
    sent with the manifest) and files inside ``asset_dirs``.

    Build it with ``AssetPolicy.operator()`` or ``AssetPolicy.uploaded(...)``; pass it to
    ``farm.manifest.parse_manifest`` (and farm.dispatch), which asks it for every file the manifest names.
    ``asset_dirs`` are resolved (links and ``..`` followed) once, here, so a lookup resolves only its path.
    """

    trusted: bool
    asset_dirs: tuple[Path, ...] = ()
    uploads: Mapping[str, bytes] = field(default_factory=dict)
    folder: str = field(default_factory=lambda: uuid.uuid4().hex)
    named: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.asset_dirs = _resolved(self.asset_dirs)

    @classmethod
    def operator(cls) -> AssetPolicy:
        """The operator's own manifest (CLI, bench): paths are taken as the operator wrote them."""
        return cls(trusted=True)

    @classmethod
    def uploaded(
        cls, *, asset_dirs: tuple[Path, ...] | list[Path], uploads: Mapping[str, bytes] | None = None
    ) -> AssetPolicy:
        """A manifest from the web: only ``uploads`` and files inside ``asset_dirs``.

        Raises UploadRefused for a badly named upload or too many of them; sizes are the caller's to check
        as it reads the request (FARM_MAX_ASSET_BYTES).
        """
        files = dict(uploads or {})
        if len(files) > MAX_UPLOADED_FILES:
            raise UploadRefused(
                f"{len(files)} files uploaded with the manifest; the limit is {MAX_UPLOADED_FILES}"
            )
        for name in files:
            check_upload_name(name)
        return cls(trusted=False, asset_dirs=tuple(asset_dirs), uploads=files)

    # -- reading ------------------------------------------------------------------------------------------

    def read_file(self, value: str, *, base_dir: Path | None, max_bytes: int) -> Asset:
        """The file ``value`` names, read (at most ``max_bytes``), or ValueError saying why not.

        Trusted: ``~`` expands, absolute paths are taken as given, relative ones resolve against ``base_dir``
        (the manifest's folder; the current one when None) and may not climb out of it. Untrusted: a plain
        name of a file uploaded with the manifest, or a path (absolute, or relative to one of the asset
        folders) that resolves, links and ``..`` followed, inside an asset folder; else ``FILE_REFUSED``.
        """
        if "\x00" in value:
            raise ValueError("path must not contain NUL bytes")
        if not self.trusted:
            if value in self.uploads:
                self.named.add(value)
                return Asset(self.store_ref(value), self.uploads[value])
            found = self._inside_asset_dirs(value)
            if found is None or not found.is_file():
                raise ValueError(FILE_REFUSED)
            return Asset(str(found), _read(found, max_bytes, shown=value))
        shown = _clip(value)
        try:
            path = Path(value).expanduser()
            if path.is_absolute():
                resolved = path.resolve()
            else:
                root = (base_dir or Path.cwd()).resolve()
                resolved = (root / path).resolve()
                if not resolved.is_relative_to(root):
                    raise ValueError(f"{shown} points outside the manifest's folder; use a path inside it")
            if not resolved.is_file():
                raise ValueError(f"{shown} does not exist or is not a file")
        except (OSError, RuntimeError) as exc:  # unknown ~user, symlink loop, no cwd
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ValueError(f"cannot read {shown}: {reason}") from None
        return Asset(str(resolved), _read(resolved, max_bytes, shown=value))

    def find_folder(self, value: str, *, base_dir: Path | None) -> Path | None:
        """The folder ``value`` names, resolved, or None where it names none the manifest may use.

        Trusted: ``~`` expands and relative paths resolve against ``base_dir`` (or the current folder); None
        when nothing exists there. Untrusted: only inside an asset folder (``..`` and links resolved first);
        nothing outside them is looked at, so None says nothing about the rest of the disk. A file found
        where a folder was named is returned too: the caller says what is wrong with it.
        """
        if not self.trusted:
            return self._inside_asset_dirs(value)
        try:
            candidate = Path(value).expanduser()
            if not candidate.is_absolute():
                candidate = (base_dir or Path.cwd()) / candidate
            return candidate.resolve() if candidate.exists() else None
        except (OSError, ValueError, RuntimeError):  # unknown ~user, name too long, symlink loop, no cwd
            return None

    def _inside_asset_dirs(self, value: str) -> Path | None:
        if not value or "\x00" in value or value.startswith("~"):
            return None
        for root in self.asset_dirs:
            try:
                target = (root / value).resolve()  # an absolute value replaces root
                if target.is_relative_to(root) and target.exists():
                    return target
            except (OSError, ValueError, RuntimeError):
                continue
        return None

    # -- uploaded files -----------------------------------------------------------------------------------

    def store_ref(self, name: str) -> str:
        """What a batch records for the uploaded file ``name``: ``store:uploads/<submission>/<name>``."""
        return f"{STORE_PREFIX}{UPLOADS_DIR}/{self.folder}/{name}"

    def unnamed_uploads(self) -> list[str]:
        """Uploaded files the manifest did not name (after parsing): the farm keeps no file nobody uses."""
        return sorted(set(self.uploads) - self.named)

    @contextmanager
    def stored(self, store: Any) -> Iterator[list[str]]:
        """Write the uploaded files the manifest named into ``store`` (an ``ArtifactStore``) for the block,
        and remove them again if the block raises: a refused submission leaves no file behind."""
        written: list[str] = []
        try:
            for name in sorted(self.named):
                key = self.store_ref(name).removeprefix(STORE_PREFIX)
                store.put(key, self.uploads[name], "application/octet-stream")
                written.append(key)
            yield written
        except BaseException:
            for key in written:
                store.delete(key)
            _remove_empty(store, f"{UPLOADS_DIR}/{self.folder}")
            raise


def read_asset(ref: str, *, store: Any = None) -> bytes:
    """The bytes of a file a batch recorded (``Asset.ref``): from the artifact store for ``store:`` names
    (uploaded files), else from the local path. What a worker calls at run time."""
    if ref.startswith(STORE_PREFIX):
        if store is None:
            raise ValueError(f"{ref} lives in the artifact store, and no store was given to read it from")
        return store.read_bytes(ref.removeprefix(STORE_PREFIX))
    return Path(ref).read_bytes()


def _resolved(roots: Iterable[Path]) -> tuple[Path, ...]:
    """The asset folders resolved, any that cannot be (a link loop) left out: nothing inside them is found."""
    resolved: list[Path] = []
    for root in roots:
        try:
            resolved.append(Path(root).resolve())
        except (OSError, ValueError, RuntimeError):
            continue
    return tuple(resolved)


def _read(path: Path, max_bytes: int, *, shown: str) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {_clip(shown)}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{_clip(shown)} is larger than {max_bytes} bytes")
    return data


def _remove_empty(store: Any, prefix: str) -> None:
    """The submission's folder of a local store, once empty (an S3 prefix is gone with its last object)."""
    try:
        folder = store.local_path(prefix)
        if folder is not None and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    except (OSError, ValueError):
        pass


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."

