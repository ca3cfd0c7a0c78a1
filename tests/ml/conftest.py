"""Shared fixtures for the model layer: tiny presets built once per session, real models loaded once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One models folder for the session: each tiny preset is built at most once."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_generator(models_dir: Path):
    from farm.ml.builds import build_and_resolve
    from farm.ml.generator import Generator

    return Generator.load(build_and_resolve("tiny", kind="generator", models_dir=models_dir))
