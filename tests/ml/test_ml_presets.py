"""Model references: presets, folders, hub ids, and clear errors for everything else."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from farm.ml.builds import build_and_resolve
from farm.ml.presets import ModelRefError, check_model_ref, known_presets, presets_to_build, resolve_model


def test_tiny_preset_resolves_to_built_folder(models_dir: Path) -> None:
    r = build_and_resolve("tiny", kind="generator", models_dir=models_dir)
    assert (r.source, r.preset, r.kind) == ("preset", "tiny", "generator")
    assert (Path(r.path_or_id) / "model_index.json").is_file()
    assert len(r.fingerprint) == 16
    assert resolve_model("tiny", kind="generator", models_dir=models_dir) == r  # built once: resolved as is


def test_resolving_builds_nothing(tmp_path: Path) -> None:
    """farm.ml.presets only resolves, so a manifest check or the doctor never builds; the caller that wants a
    model (a worker, a replay) builds it with farm.ml.builds first."""
    for ref, kind in (("tiny", "generator"), ("random-sdxl", "generator"), ("clip-score", "scorer")):
        with pytest.raises(ModelRefError, match="has not been built on this worker"):
            resolve_model(ref, kind=kind, models_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("ref", "kind", "needed"),
    [
        ("tiny", "generator", ["tiny"]),
        ("tiny-aesthetic", "scorer", ["tiny-aesthetic"]),
        ("clip-score", "scorer", ["tiny-clip"]),
        ("clip-score:tiny-clip", "scorer", ["tiny-clip"]),
        ("clip-score:clip-vit-b32", "scorer", []),
        ("sd-turbo", "generator", []),
        ("owner/name", "generator", []),
        ("tiny", "validator", []),  # unusable: nothing is built for it
    ],
)
def test_presets_to_build(ref: str, kind: str, needed: list[str]) -> None:
    assert presets_to_build(ref, kind) == needed


def test_every_preset_built_here_has_a_folder_a_marker_and_a_builder() -> None:
    from farm.ml.builds import _builder
    from farm.ml.layout import TINY_FOLDERS, TINY_MARKERS
    from farm.ml.presets import TINY_PRESETS

    built = {name for names in TINY_PRESETS.values() for name in names}
    assert built == set(TINY_FOLDERS) == set(TINY_MARKERS)
    assert all(callable(_builder(name)) for name in built)


@pytest.mark.parametrize(
    ("ref", "kind", "hub_id"),
    [
        ("sd-turbo", "generator", "stabilityai/sd-turbo"),
        ("sdxl-turbo", "generator", "stabilityai/sdxl-turbo"),
        ("sdxl-base", "generator", "stabilityai/stable-diffusion-xl-base-1.0"),
        ("flux-schnell", "generator", "black-forest-labs/FLUX.1-schnell"),
        ("clip-vit-b32", "validator", "openai/clip-vit-base-patch32"),
        ("siglip-base", "validator", "google/siglip-base-patch16-224"),
    ],
)
def test_named_presets_resolve_to_hub_ids(ref: str, kind: str, hub_id: str, tmp_path: Path) -> None:
    r = resolve_model(ref, kind=kind, models_dir=tmp_path)
    assert (r.source, r.path_or_id, r.fingerprint, r.preset) == ("hub", hub_id, hub_id, ref)
    assert list(tmp_path.iterdir()) == []  # nothing built or downloaded


def test_hub_id_is_accepted_as_is(tmp_path: Path) -> None:
    r = resolve_model("someone/my-model_v2.1", kind="generator", models_dir=tmp_path)
    assert (r.source, r.path_or_id, r.preset) == ("hub", "someone/my-model_v2.1", None)


def test_local_folder_is_accepted(models_dir: Path, tmp_path: Path) -> None:
    preset = build_and_resolve("tiny-clip", kind="validator", models_dir=models_dir)
    r = resolve_model(preset.path_or_id, kind="validator", models_dir=tmp_path)
    assert r.source == "folder" and r.fingerprint == preset.fingerprint


def test_folder_that_is_not_a_pipeline_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    msg = check_model_ref(str(tmp_path), "generator")
    assert msg is not None and "model_index.json" in msg and "not a diffusers pipeline" in msg
    with pytest.raises(ModelRefError, match="model_index.json"):
        resolve_model(str(tmp_path), kind="generator", models_dir=tmp_path)


def test_missing_folder_is_rejected(tmp_path: Path) -> None:
    msg = check_model_ref(str(tmp_path / "nope"), "scorer")
    assert msg is not None and "does not exist" in msg


def test_unknown_ref_names_the_presets(tmp_path: Path) -> None:
    with pytest.raises(ModelRefError) as info:
        resolve_model("stable-diffusion-9", kind="generator", models_dir=tmp_path)
    for name in known_presets("generator"):
        assert name in str(info.value)


def test_preset_of_another_kind_is_rejected() -> None:
    msg = check_model_ref("tiny-clip", "generator")
    assert msg is not None and "validator preset" in msg


def test_check_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for kind, ref in [
        ("generator", "tiny"),
        ("generator", "tiny-xl"),
        ("validator", "tiny-clip"),
        ("scorer", "tiny-aesthetic"),
        ("scorer", "tiny-image-reward"),
        ("scorer", "image-reward"),
        ("scorer", "clip-score"),
        ("scorer", "clip-score:tiny-clip"),
        ("generator", "a/b"),
    ]:
        assert check_model_ref(ref, kind) is None
    assert check_model_ref("", "generator") is not None
    assert list(tmp_path.iterdir()) == []


def test_unknown_kind_raises() -> None:
    with pytest.raises(ValueError, match="kind"):
        check_model_ref("tiny", "upscaler")


def test_relative_owner_name_and_bare_words_are_never_looked_up_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker resolves the references an uploaded manifest sent: a folder of a hub id's spelling or a bare
    word in its working folder must neither answer differently nor be loaded."""
    (tmp_path / "owner" / "name").mkdir(parents=True)
    (tmp_path / "var").mkdir()
    monkeypatch.chdir(tmp_path)
    for kind in ("generator", "validator", "scorer"):
        assert check_model_ref("owner/name", kind) is None
        assert resolve_model("owner/name", kind=kind, models_dir=tmp_path / "m").source == "hub"
        assert check_model_ref("var", kind) == check_model_ref("zzz", kind).replace("'zzz'", "'var'")
    # Spelled as paths they are still the operator's folders.
    assert "config.json" in check_model_ref("./owner/name", "validator")
    assert "config.json" in check_model_ref(str(tmp_path / "var"), "validator")


def test_the_manifest_accepts_exactly_the_generator_presets_and_schedulers_the_ml_layer_knows() -> None:
    """farm.manifest keeps its own lists (it may not import the ML layer); a name validation accepts that the
    worker does not know would fail every candidate at run time, so the lists must agree."""
    from farm.manifest import MODEL_PRESETS, SCHEDULERS
    from farm.ml.generator import SCHEDULERS as GENERATOR_SCHEDULERS
    from farm.ml.presets import HUB_PRESETS, TINY_PRESETS

    assert set(MODEL_PRESETS) == set(TINY_PRESETS["generator"]) | set(HUB_PRESETS["generator"])
    assert set(SCHEDULERS) == set(GENERATOR_SCHEDULERS)


@pytest.mark.parametrize(
    ("value", "is_path", "is_hub"),
    [
        ("./x", True, False),
        ("../x", True, False),
        ("a/b/../../etc", True, False),
        ("x/..", True, False),
        ("~root", True, False),
        ("/abs", True, False),
        ("owner/name", False, True),
        ("owner/name/extra", True, False),
        ("C:\\x", True, False),
        ("name", False, False),
        ("a--b/name", False, False),
        ("owner/name\n", False, False),
    ],
)
def test_one_rule_says_what_is_a_path_and_what_is_a_hub_id(value: str, is_path: bool, is_hub: bool) -> None:
    """Manifest validation and the worker's resolution ask the same two functions: a spelling one takes for a
    hub id and the other for a path would be checked by one rule and loaded by another."""
    import farm.manifest
    from farm.assets import is_hub_id, looks_like_path
    from farm.ml.presets import spelled_path

    assert (looks_like_path(value), is_hub_id(value)) == (is_path, is_hub)
    assert (spelled_path(value) is not None) == is_path
    assert farm.manifest.looks_like_path is looks_like_path and farm.manifest.is_hub_id is is_hub_id


def _load(kind: str, resolved):  # noqa: ANN202 - a generator, a validator or a scorer
    if kind == "generator":
        from farm.ml.generator import Generator

        return Generator.load(resolved)
    if kind == "validator":
        from farm.ml.validation import ClipAlignment

        return ClipAlignment.load(resolved)
    from farm.ml.scoring import load_scorer

    return load_scorer(resolved)


#: (kind, the preset whose folder stands in for the model, the reference naming hub id ``acme/<name>``).
_HUB_CASES = [
    ("generator", "tiny", "{}"),
    ("validator", "tiny-clip", "{}"),
    ("scorer", "tiny-clip", "clip-score:{}"),
]


def _preset_kind(kind: str) -> str:
    return "generator" if kind == "generator" else "validator"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache of this test's own, offline, as a worker without the hub has it."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize(("kind", "preset", "ref"), _HUB_CASES)
def test_a_hub_id_is_never_loaded_from_the_working_folder(
    kind: str,
    preset: str,
    ref: str,
    models_dir: Path,
    hf_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``acme/secret`` from an uploaded manifest: diffusers and transformers would load ./acme/secret of the
    worker's working folder, and their errors told an uploader whether it exists. The same error either way,
    naming the hub id and how to fetch it, and nothing about the disk."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    resolved = resolve_model(ref.format("acme/secret"), kind=kind, models_dir=models_dir)
    with pytest.raises(Exception) as absent:  # noqa: PT011 - the error must be the same, whatever it is
        _load(kind, resolved)
    real = build_and_resolve(preset, kind=_preset_kind(kind), models_dir=models_dir)
    shutil.copytree(real.path_or_id, work / "acme" / "secret")  # a model that loads, under the hub id's name
    with pytest.raises(Exception) as present:  # noqa: PT011
        _load(kind, resolved)
    assert (type(present.value), str(present.value)) == (type(absent.value), str(absent.value))
    assert isinstance(absent.value, ModelRefError)
    message = str(absent.value)
    assert "'acme/secret'" in message and "hf download acme/secret" in message
    assert str(tmp_path) not in message and "hf-cache" not in message


def _cache_repo(cache: Path, hub_id: str, folder: Path) -> Path:
    """Lay ``folder`` out in ``cache`` as the hub library does: blobs by hash, a snapshot of links to them
    named by a commit, and ``refs/main`` naming that commit. Returns the snapshot folder."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    commit = hashlib.sha1(hub_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.mark.parametrize(("kind", "preset", "ref"), _HUB_CASES)
def test_a_cached_hub_id_loads_from_its_snapshot_not_from_the_working_folder(
    kind: str,
    preset: str,
    ref: str,
    models_dir: Path,
    hf_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hub id in the worker's Hugging Face cache loads from its absolute snapshot folder, even where the
    working folder holds a folder of the same spelling; the recipe keeps the hub id (replay, fingerprints)."""
    real = build_and_resolve(preset, kind=_preset_kind(kind), models_dir=models_dir)
    snapshot = _cache_repo(hf_cache, "acme/tiny", Path(real.path_or_id))
    work = tmp_path / "work"
    (work / "acme" / "tiny").mkdir(parents=True)
    for marker in ("model_index.json", "config.json"):
        (work / "acme" / "tiny" / marker).write_text("not a model")
    monkeypatch.chdir(work)
    resolved = resolve_model(ref.format("acme/tiny"), kind=kind, models_dir=models_dir)
    assert (resolved.source, resolved.path_or_id, resolved.fingerprint) == ("hub", "acme/tiny", "acme/tiny")
    loaded = _load(kind, resolved)
    if kind == "generator":
        assert loaded.pipe.name_or_path == str(snapshot)
        recipe = loaded.recipe()
        assert (recipe["model_path_or_id"], recipe["fingerprint"]) == ("acme/tiny", "acme/tiny")
    else:
        alignment = loaded if kind == "validator" else loaded.alignment
        assert alignment.model.name_or_path == str(snapshot)
