"""Model hashes as the Stable Diffusion ecosystem writes them: "Model hash" in A1111's PNG text, on Civitai.

Why a hash of the weights and not ``farm.ml.presets.folder_fingerprint``: the fingerprint (configs plus file
sizes) is cheap and tells replay whether a folder changed shape, but it is ours alone. A1111 and Civitai know
a checkpoint by its "AutoV2" hash, the first 10 hex digits of the sha256 of the checkpoint file, and that is
what ``model_hash`` gives for a single file. A diffusers folder has no single file, so it gets a hash of its
own, defined so that anyone can compute it again:

    sha256 over the folder's weight files (suffix .safetensors, .bin, .ckpt, .pt, .pth, .onnx, .msgpack,
    .gguf; files and folders whose name starts with "." skipped, links followed), taken in the order of their
    relative paths with "/" separators, each fed as  <relative path> NUL <size in bytes as decimal> NUL
    <the file's bytes>; the first 10 hex digits of the digest.

That is every weight file the folder holds: a hub snapshot that also holds another variant's weights (fp16)
hashes differently from one that does not, which is the honest answer, since it is a different folder.

Weights can be gigabytes, so files are read in 8 MiB chunks (hashlib and file reads release the GIL, so a
hash runs beside a forward pass), and each model is hashed once per process: ``model_hash`` keeps its result
per path, with the weight files' sizes and modification times, and hashes again only when those change.
No torch here: hashing needs none.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

#: Hex digits A1111 writes of a checkpoint's sha256 (its "AutoV2" hash); the folder hash is as long.
HASH_DIGITS = 10
#: Suffixes of the files that hold weights (what the folder hash covers).
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".gguf"})
CHUNK = 8 * 2**20

#: (what was hashed, its weight files' stat signature) -> hash; see ``model_hash``.
_cache: dict[tuple[str, tuple[tuple[str, int, int], ...]], str | None] = {}
_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """The full sha256 (hex) of one file, streamed in chunks (LoRA files are recorded by this too)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weight_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative posix path, file) of each weight file under ``folder``, sorted by relative path."""
    folder = Path(folder)
    found: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") or Path(name).suffix.lower() not in WEIGHT_SUFFIXES:
                continue
            file = Path(root) / name
            if file.is_file():
                found.append((file.relative_to(folder).as_posix(), file))
    return sorted(found)


def folder_hash(folder: Path) -> str | None:
    """The documented hash of a diffusers folder's weight files (module docstring); None when it has none."""
    files = weight_files(folder)
    if not files:
        return None
    digest = hashlib.sha256()
    for rel, file in files:
        digest.update(rel.encode() + b"\0" + str(file.stat().st_size).encode() + b"\0")
        with open(file, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:HASH_DIGITS]


def autov2(path: Path) -> str:
    """A1111's "AutoV2" hash of a single-file checkpoint: the first 10 hex digits of its sha256."""
    return file_sha256(path)[:HASH_DIGITS]


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """What must not change for a cached hash to stand: each weight file's path, size and mtime."""
    if path.is_file():
        st = path.stat()
        return ((path.name, st.st_size, st.st_mtime_ns),)
    out = []
    for rel, file in weight_files(path):
        st = file.stat()
        out.append((rel, st.st_size, st.st_mtime_ns))
    return tuple(out)


def model_hash(path: Path | str) -> str | None:
    """The model hash of a local checkpoint file (AutoV2) or diffusers folder (``folder_hash``); None for a
    folder without weight files. Computed once per process for each path and content (listing the folder
    and a stat per weight file is all a repeated call costs)."""
    path = Path(path).resolve()
    key = (str(path), _signature(path))
    with _lock:
        if key in _cache:
            return _cache[key]
    value = autov2(path) if path.is_file() else folder_hash(path)
    with _lock:
        _cache[key] = value
    return value
