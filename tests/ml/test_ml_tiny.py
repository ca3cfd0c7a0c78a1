"""Tiny presets: built deterministically offline, loaded back through the libraries' own from_pretrained."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from farm.ml import builds, layout, tiny
from farm.ml.presets import folder_fingerprint


def test_tokenizer_loads_from_folder_with_full_vocab(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    size = tiny._tokenizer_files(tmp_path)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == size > 500  # not the 2-token tokenizer transformers 5 gives for vocab_file=...
    assert tok.model_max_length == 77
    ids = tok("the thing and a cat")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1]) == "the</w>"  # merges are applied
    assert tok.decode(ids, skip_special_tokens=True).strip() == "the thing and a cat"


def test_tiny_sd_loads_as_diffusion_pipeline(models_dir: Path) -> None:
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    folder = builds.ensure_preset("tiny", models_dir)
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.tokenizer.model_max_length == 77


def test_tiny_sdxl_loads_as_diffusion_pipeline(models_dir: Path) -> None:
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    pipe = DiffusionPipeline.from_pretrained(str(builds.ensure_preset("tiny-xl", models_dir)))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_tiny_clip_loads_with_auto_classes(models_dir: Path) -> None:
    from transformers import AutoModel, AutoProcessor, CLIPModel, CLIPProcessor

    folder = builds.ensure_preset("tiny-clip", models_dir)
    assert isinstance(CLIPModel.from_pretrained(str(folder)), CLIPModel)
    assert isinstance(CLIPProcessor.from_pretrained(str(folder)), CLIPProcessor)
    assert type(AutoModel.from_pretrained(str(folder))).__name__ == "CLIPModel"
    assert type(AutoProcessor.from_pretrained(str(folder))).__name__ == "CLIPProcessor"


def test_tiny_aesthetic_folder_layout(models_dir: Path) -> None:
    from transformers import CLIPVisionModelWithProjection

    folder = builds.ensure_preset("tiny-aesthetic", models_dir)
    assert (folder / layout.AESTHETIC_CONFIG).is_file() and (folder / layout.AESTHETIC_HEAD).is_file()
    assert isinstance(
        CLIPVisionModelWithProjection.from_pretrained(str(folder)), CLIPVisionModelWithProjection
    )


def test_builds_are_deterministic(tmp_path: Path) -> None:
    a = tiny.build_tiny_sd(tmp_path / "a")
    b = tiny.build_tiny_sd(tmp_path / "b")
    assert folder_fingerprint(a) == folder_fingerprint(b)
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()


def test_ensure_builds_once_and_leaves_no_temp(tmp_path: Path) -> None:
    first = builds.ensure_preset("tiny-clip", tmp_path)
    mtime = os.stat(first / "config.json").st_mtime_ns
    assert builds.ensure_preset("tiny-clip", tmp_path) == first
    assert os.stat(first / "config.json").st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_ensure_race_leaves_one_complete_copy(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(builds.ensure_preset("tiny-aesthetic", tmp_path))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path) -> Path:
        (path / "half.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        builds._ensure(tmp_path, "tiny-clip", broken)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_existing_folder_is_reported(tmp_path: Path) -> None:
    (tmp_path / layout.TINY_FOLDERS["tiny-clip"]).mkdir()
    (tmp_path / layout.TINY_FOLDERS["tiny-clip"] / "junk.txt").write_text("x")
    with pytest.raises(RuntimeError, match="is not a complete .tiny-clip. model"):
        builds.ensure_preset("tiny-clip", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [layout.TINY_FOLDERS["tiny-clip"]]
