"""Model hashes: A1111's AutoV2 of one file, the documented hash of a diffusers folder, once per process."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from farm.ml import hashes
from farm.ml.hashes import HASH_DIGITS, autov2, file_sha256, folder_hash, model_hash, weight_files


def test_a_single_file_checkpoint_has_a1111s_autov2_hash_streamed_in_chunks(tmp_path, monkeypatch):
    data = os.urandom(1000) * 7
    ckpt = tmp_path / "dream.safetensors"
    ckpt.write_bytes(data)
    monkeypatch.setattr(hashes, "CHUNK", 256)  # many chunks: the stream must add up to the whole file
    assert file_sha256(ckpt) == hashlib.sha256(data).hexdigest()
    assert autov2(ckpt) == hashlib.sha256(data).hexdigest()[:10]
    assert model_hash(ckpt) == autov2(ckpt) and HASH_DIGITS == 10


def _pipeline_folder(root: Path) -> Path:
    """A diffusers-shaped folder: weights in component folders, configs, a hidden cache folder, a link."""
    (root / "unet").mkdir(parents=True)
    (root / "vae").mkdir()
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"unet weights" * 100)
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"vae weights" * 50)
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (root / "unet" / "config.json").write_text("{}")
    (root / ".cache" / "huggingface" / "x.safetensors").write_bytes(b"download state, not weights")
    blobs = root.parent / f"{root.name}-blobs"
    blobs.mkdir()
    (blobs / "abc").write_bytes(b"text encoder weights")
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "model.safetensors").symlink_to(blobs / "abc")  # as a hub snapshot holds it
    return root


def test_a_folder_hash_is_the_documented_sha256_over_its_weight_files_in_path_order(tmp_path):
    folder = _pipeline_folder(tmp_path / "pipe")
    rels = [rel for rel, _ in weight_files(folder)]
    assert rels == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    # Recomputed here from the definition in farm.ml.hashes' docstring, not through its code.
    digest = hashlib.sha256()
    for rel in rels:
        data = (folder / rel).read_bytes()
        digest.update(f"{rel}\0{len(data)}\0".encode() + data)
    assert folder_hash(folder) == digest.hexdigest()[:10]


def test_configs_do_not_move_the_folder_hash_and_weights_do(tmp_path):
    folder = _pipeline_folder(tmp_path / "pipe")
    before = folder_hash(folder)
    (folder / "unet" / "config.json").write_text('{"changed": true}')
    assert folder_hash(folder) == before
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"other vae weights" * 50)
    assert folder_hash(folder) != before


def test_a_folder_without_weight_files_has_no_hash(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    assert folder_hash(tmp_path) is None and model_hash(tmp_path) is None


def test_a_model_is_hashed_once_per_process_until_its_files_change(tmp_path, monkeypatch):
    folder = _pipeline_folder(tmp_path / "pipe")
    calls: list[Path] = []
    real = hashes.folder_hash

    def counting(path: Path) -> str | None:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(hashes, "folder_hash", counting)
    first = model_hash(folder)
    assert model_hash(folder) == model_hash(str(folder)) == first
    assert len(calls) == 1, "hashed again though nothing changed"
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"retrained unet" * 100)
    os.utime(weights, ns=(1, 1))  # a new size and mtime, whatever the clock's resolution
    assert model_hash(folder) not in (None, first)
    assert len(calls) == 2


@pytest.fixture(scope="module")
def tiny_folder(models_dir: Path) -> Path:
    from farm.ml.builds import build_and_resolve

    return Path(build_and_resolve("tiny", kind="generator", models_dir=models_dir).path_or_id)


def test_the_tiny_models_hash_covers_its_three_weight_files(tiny_folder):
    assert [rel for rel, _ in weight_files(tiny_folder)] == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert len(model_hash(tiny_folder)) == 10
