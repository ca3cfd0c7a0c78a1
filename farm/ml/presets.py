"""Model references: what a manifest may name as generator, validator or scorer, and where it comes from.

A reference is one of: a preset name (tiny ones are built locally on first use, named real ones map to hub
ids), a local folder holding a saved model, or a hub id ``owner/name`` loaded at run time through
``from_pretrained``. ``check_model_ref`` validates cheaply (no import of torch models) so a bad manifest
fails before dispatch; ``resolve_model`` turns a reference into something loadable plus a fingerprint for
provenance. Nothing here builds: a worker calls ``farm.ml.builds.build_and_resolve``, which builds the tiny
preset a reference needs (``presets_to_build``) and then resolves it here.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from farm.assets import is_hub_id, looks_like_path
from farm.formats import CLIP_SCORE, MODEL_FOLDER_MARKERS, model_folder_problem
from farm.ml.layout import TINY_FOLDERS, TINY_MARKERS

log = logging.getLogger(__name__)

KINDS = ("generator", "validator", "scorer")

#: Presets the farm builds itself (farm.ml.builds; folders in farm.ml.layout), per kind.
TINY_PRESETS: dict[str, tuple[str, ...]] = {
    "generator": ("tiny", "tiny-xl", "random-sdxl"),
    "validator": ("tiny-clip",),
    "scorer": ("tiny-aesthetic", "tiny-image-reward"),
}

#: Named real checkpoints, per kind: preset -> hub id.
HUB_PRESETS: dict[str, dict[str, str]] = {
    "generator": {
        "sd-turbo": "stabilityai/sd-turbo",
        "sdxl-turbo": "stabilityai/sdxl-turbo",
        "sdxl-base": "stabilityai/stable-diffusion-xl-base-1.0",
        "flux-schnell": "black-forest-labs/FLUX.1-schnell",
    },
    "validator": {
        "clip-vit-b32": "openai/clip-vit-base-patch32",
        "siglip-base": "google/siglip-base-patch16-224",
    },
    "scorer": {
        # Not an owner/name repo id: the checkpoint name the image-reward package's own loader downloads.
        "image-reward": "ImageReward-v1.0",
    },
}

#: Checkpoint names ``ImageReward.load`` accepts and downloads itself (its ``available_models()``).
IMAGE_REWARD_HUB_NAMES: tuple[str, ...] = ("ImageReward-v1.0",)

#: The validator ``clip-score`` (farm.formats.CLIP_SCORE) scores with when none is named after it.
DEFAULT_CLIP_SCORE_VALIDATOR = "tiny-clip"


class ModelRefError(ValueError):
    """A model reference that names no preset, no usable folder and no hub id."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made concrete: where to load it from and a fingerprint for provenance."""

    ref: str
    kind: Literal["generator", "validator", "scorer"]
    source: Literal["preset", "folder", "hub"]
    path_or_id: str
    fingerprint: str
    preset: str | None = None


def known_presets(kind: str) -> list[str]:
    """All preset names valid for ``kind``, tiny ones first."""
    _check_kind(kind)
    return [*TINY_PRESETS[kind], *HUB_PRESETS[kind], *([CLIP_SCORE] if kind == "scorer" else [])]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(KINDS)}")


def _unknown(ref: str, kind: str) -> str:
    return (
        f"unknown {kind} model {ref!r}: not a preset ({', '.join(known_presets(kind))}), "
        f"not a local folder, and not a hub id of the form owner/name"
    )


def _folder_error(path: Path, kind: str) -> str | None:
    problem = model_folder_problem(path, kind)
    return None if problem is None else f"folder {str(path)!r} {problem}"


def _clip_score_validator(ref: str) -> str | None:
    """The validator reference inside a ``clip-score[:<validator>]`` scorer reference, else None."""
    if ref == CLIP_SCORE:
        return DEFAULT_CLIP_SCORE_VALIDATOR
    if ref.startswith(CLIP_SCORE + ":"):
        return ref[len(CLIP_SCORE) + 1 :]
    return None


def spelled_path(ref: str) -> Path | None:
    """The local path ``ref`` spells, or None where it spells a hub id (``owner/name``) or a plain name.

    Which spellings are paths is ``farm.assets.looks_like_path``'s rule, the one manifest validation applies:
    a relative ``owner/name`` or a bare word is never looked up in this process's working folder. Why:
    farm.manifest records the folders a manifest names as absolute paths (resolved against the manifest's
    folder, or inside FARM_ASSET_DIRS for an uploaded manifest), so a worker's working folder is never what a
    manifest means, and looking there would let an uploaded manifest probe it and load models from it.
    """
    if looks_like_path(ref):
        return Path(ref).expanduser()
    return None


def check_model_ref(ref: str, kind: str) -> str | None:
    """Return an error message if ``ref`` cannot be a ``kind`` model, else None. Builds and loads nothing.

    Why: manifest validation runs in the web process before dispatch and must be cheap; a hub id is accepted
    on shape alone because whether it downloads is only known on the worker.
    """
    _check_kind(kind)
    if not isinstance(ref, str) or not ref.strip():
        return f"{kind} model reference is empty"
    if ref in TINY_PRESETS[kind] or ref in HUB_PRESETS[kind]:
        return None
    inner = _clip_score_validator(ref) if kind == "scorer" else None
    if inner is not None:
        error = check_model_ref(inner, "validator")
        return None if error is None else f"scorer {ref!r}: {error}"
    for other in KINDS:
        if other != kind and (ref in TINY_PRESETS[other] or ref in HUB_PRESETS[other]):
            return (
                f"{ref!r} is a {other} preset, not a {kind}; {kind} presets: {', '.join(known_presets(kind))}"
            )
    path = spelled_path(ref)
    if path is not None:
        if path.is_dir():
            return _folder_error(path, kind)
        return f"{kind} model folder {ref!r} does not exist"
    if is_hub_id(ref):
        return None
    return _unknown(ref, kind)


def folder_fingerprint(path: Path) -> str:
    """Short sha256 over a model folder: full content of its small json/txt files, name+size of the rest.

    Why not hash the weights: they are large; their sizes together with the configs identify a checkpoint well
    enough for provenance, and this stays fast on multi-gigabyte folders.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        digest.update(rel.encode())
        size = file.stat().st_size
        if file.suffix in (".json", ".txt") and size <= 1_000_000:
            digest.update(file.read_bytes())
        else:
            digest.update(str(size).encode())
    return digest.hexdigest()[:16]


def presets_to_build(ref: str, kind: str) -> list[str]:
    """The presets built by the farm itself that ``ref`` needs before it resolves: the tiny preset it names
    (or the validator inside ``clip-score:<validator>``); none for any other or an unusable reference."""
    if check_model_ref(ref, kind) is not None:
        return []
    inner = _clip_score_validator(ref) if kind == "scorer" else None
    if inner is not None:
        return presets_to_build(inner, "validator")
    return [ref] if ref in TINY_PRESETS[kind] else []


def resolve_model(ref: str, *, kind: str, models_dir: Path) -> ResolvedModel:
    """Turn a reference into a ``ResolvedModel``; a tiny preset must already be built under ``models_dir``.

    Raises ``ModelRefError`` with the reason (and the known presets) when the reference is unusable, or names
    a tiny preset not built yet (``farm.ml.builds.build_and_resolve`` builds it first).
    """
    error = check_model_ref(ref, kind)
    if error is not None:
        raise ModelRefError(error)
    inner = _clip_score_validator(ref) if kind == "scorer" else None
    if inner is not None:
        validator = resolve_model(inner, kind="validator", models_dir=models_dir)
        return ResolvedModel(
            ref, "scorer", validator.source, validator.path_or_id, validator.fingerprint, CLIP_SCORE
        )
    if ref in TINY_PRESETS[kind]:
        folder = Path(models_dir) / TINY_FOLDERS[ref]
        if not (folder / TINY_MARKERS[ref]).is_file():
            raise ModelRefError(f"{kind} preset {ref!r} has not been built on this worker")
        return ResolvedModel(ref, kind, "preset", str(folder), folder_fingerprint(folder), ref)  # type: ignore[arg-type]
    if ref in HUB_PRESETS[kind]:
        hub_id = HUB_PRESETS[kind][ref]
        return ResolvedModel(ref, kind, "hub", hub_id, hub_id, ref)  # type: ignore[arg-type]
    path = spelled_path(ref)
    if path is not None and path.is_dir():
        folder = path.resolve()
        return ResolvedModel(ref, kind, "folder", str(folder), folder_fingerprint(folder), None)  # type: ignore[arg-type]
    return ResolvedModel(ref, kind, "hub", ref, ref, None)  # type: ignore[arg-type]


def model_folder(resolved: ResolvedModel) -> str:
    """What a loader is given for ``resolved``: a preset's or a local model's folder as resolved, and for a
    hub id the absolute folder of its snapshot in the Hugging Face cache (``hub_snapshot``).

    Why never the hub id itself: ``DiffusionPipeline.from_pretrained`` and ``AutoModel.from_pretrained`` first
    take a name as a folder relative to the working directory, and only then as a hub id. A hub id comes from
    whoever wrote the manifest, an uploader included, so ``acme/secret`` would probe the worker's working
    folder (the two errors differ) and load whatever model lies there. ``resolved`` keeps the hub id as its
    ``path_or_id`` and fingerprint, so recipes, replay and fingerprints are unchanged.
    """
    if resolved.source != "hub":
        return resolved.path_or_id
    return str(hub_snapshot(resolved.path_or_id, resolved.kind))


#: What a hub validator or scorer fetches when the worker may download: configs, tokenizer files and
#: safetensors weights (``*.bin`` only for a repo without safetensors), not the repo's other weight formats.
_HUB_MODEL_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]


def hub_snapshot(hub_id: str, kind: str) -> Path:
    """The absolute snapshot folder of ``hub_id`` in the Hugging Face cache, downloaded first unless
    HF_HUB_OFFLINE is set (the hub library's own setting, which it honours everywhere else too).

    Raises ``ModelRefError`` naming the hub id and how to fetch it when the model is not available: the
    message says nothing about this worker's disk, since it is stored on candidates and shown to whoever
    submitted the manifest.
    """
    from huggingface_hub import constants

    cached = _cached_snapshot(hub_id, kind)
    if constants.HF_HUB_OFFLINE:
        if cached is None:
            raise ModelRefError(
                f"{kind} model {hub_id!r} is not in this worker's Hugging Face cache, and HF_HUB_OFFLINE is "
                f"set so it is not downloaded: {_fetch_hint(hub_id)}"
            )
        return cached
    try:
        return Path(os.path.abspath(_download(hub_id, kind)))
    except Exception as exc:  # noqa: BLE001 - the hub's failures vary (network, not found, gated)
        if cached is not None:
            log.warning("%s %r: the hub did not answer (%s); using its cached snapshot", kind, hub_id, exc)
            return cached
        raise ModelRefError(
            f"{kind} model {hub_id!r} could not be downloaded from the Hugging Face hub "
            f"({type(exc).__name__}) and is not in this worker's cache: {_fetch_hint(hub_id)}"
        ) from None


def _fetch_hint(hub_id: str) -> str:
    return (
        f"fetch it once into the Hugging Face cache the workers use (`hf download {hub_id}` on the worker "
        "host, or a run with HF_HUB_OFFLINE unset), or name a preset"
    )


def _cached_snapshot(hub_id: str, kind: str) -> Path | None:
    """The cached snapshot folder (of the ``main`` revision) that holds a marker file of ``kind``, or None.

    Why look for a marker rather than ask ``snapshot_download(local_files_only=True)``: a snapshot fetched
    by a library's own loader holds only the files that loader wanted, and the hub library calls such a
    snapshot incomplete once it knows the repo's full listing.
    """
    from huggingface_hub import try_to_load_from_cache

    for marker in MODEL_FOLDER_MARKERS[kind]:
        try:
            hit = try_to_load_from_cache(hub_id, marker)
        except ValueError:  # HFValidationError: not an id the hub accepts, so never cached
            return None
        if isinstance(hit, str):
            return Path(os.path.abspath(os.path.dirname(hit)))
    return None


def _download(hub_id: str, kind: str) -> str:
    """Fetch ``hub_id`` into the cache the way its library's loader would, and return its snapshot folder."""
    if kind == "generator":
        from diffusers import DiffusionPipeline

        # diffusers' own download: the files of the pipeline's components only, as from_pretrained fetches.
        return str(DiffusionPipeline.download(hub_id))
    from huggingface_hub import snapshot_download

    folder = snapshot_download(hub_id, allow_patterns=_HUB_MODEL_FILES)
    if not any(Path(folder).glob("*.safetensors")):
        folder = snapshot_download(hub_id, allow_patterns=[*_HUB_MODEL_FILES, "*.bin"])
    return str(folder)


def describe(resolved: ResolvedModel) -> dict[str, str | None]:
    """A JSON-ready view of a resolved model for recipes and sidecars."""
    return asdict(resolved)
