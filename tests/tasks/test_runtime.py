"""A device worker's runtime: what it preloads is what a batch in that precision uses, loaded once."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest

from farm import placement
from farm.config import ConfigError, load_settings
from farm.tasks.runtime import Runtime


def test_the_preloaded_generator_takes_the_configured_dtype_and_serves_batches_of_it_without_a_reload(
    settings,
):
    rt = Runtime(replace(settings, preload_dtype="bf16"))
    rt.preload()
    key = placement.generator_key("tiny", dtype="bf16")
    assert key in rt.models.registry.loaded()
    assert placement.generator_key("tiny") not in rt.models.registry.loaded(), "no fp32 copy loaded beside it"
    assert rt.models.generator("tiny", dtype="bf16") is rt.models.generator("tiny", dtype="bf16")
    assert rt.models.registry.loads()[key] == 1
    assert rt.models.generator("tiny", dtype="bf16").pipe.unet.dtype.is_floating_point
    assert str(rt.models.generator("tiny", dtype="bf16").pipe.unet.dtype) == "torch.bfloat16"


def test_preload_dtype_defaults_to_fp32_and_rejects_other_names_by_variable(tmp_path):
    base = {"FARM_HOME": str(tmp_path), "FARM_DEVICES": "cuda0=cpu"}
    assert load_settings(base).preload_dtype == "fp32"
    assert load_settings({**base, "FARM_PRELOAD_DTYPE": "fp16"}).preload_dtype == "fp16"
    with pytest.raises(ConfigError, match="FARM_PRELOAD_DTYPE must be one of fp32, fp16, bf16, got 'half'"):
        load_settings({**base, "FARM_PRELOAD_DTYPE": "half"})


def test_qc_mode_defaults_to_inline_and_rejects_other_names_by_variable(tmp_path):
    base = {"FARM_HOME": str(tmp_path), "FARM_DEVICES": "cuda0=cpu"}
    settings = load_settings(base)
    assert settings.qc == "inline"
    assert settings.handoff_dir.parent in (Path("/dev/shm"), tmp_path), "shared memory where the host has it"
    assert load_settings({**base, "FARM_QC": "worker"}).qc == "worker"
    assert load_settings({**base, "FARM_HANDOFF_DIR": str(tmp_path / "h")}).handoff_dir == tmp_path / "h"
    with pytest.raises(ConfigError, match="FARM_QC must be one of inline, worker, got 'process'"):
        load_settings({**base, "FARM_QC": "process"})


def test_with_qc_workers_the_generating_worker_preloads_only_generators_and_its_qc_worker_only_checks(
    settings, monkeypatch
):
    split = replace(settings, qc="worker")
    monkeypatch.setenv("FARM_PINNED_QUEUE", "cuda0")
    gen = Runtime(split)
    gen.preload()
    assert gen.qc_queue == f"qc-cuda0@{socket.gethostname()}" and gen.images.handoff is not None
    assert [k.split(":")[0] for k in gen.models.registry.loaded()] == ["generator"]
    monkeypatch.setenv("FARM_PINNED_ROLE", "qc")
    qc = Runtime(split)
    qc.preload()
    assert qc.name == gen.qc_queue and qc.qc_queue is None
    assert {k.split(":")[0] for k in qc.models.registry.loaded()} == {"validator", "scorer", "moderation"}
    monkeypatch.delenv("FARM_PINNED_ROLE")
    inline = Runtime(settings)
    assert inline.qc_queue is None and inline.images.handoff is None
