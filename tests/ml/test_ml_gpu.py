"""The model layer on a CUDA device: fp16 generation, CPU offload, seeds that mean the same as on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ml_images import grey, noise

from farm.ml.builds import build_and_resolve
from farm.ml.generator import Generator
from farm.ml.registry import ModelRegistry, estimate_bytes
from farm.ml.scoring import load_scorer
from farm.ml.validation import ClipAlignment

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KW = dict(prompt="a red cat", negative_prompt="blurry", steps=2, guidance=5.0, width=64, height=64)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_generates_on_cuda_like_on_cpu(models_dir: Path, dtype: str) -> None:
    resolved = build_and_resolve("tiny", kind="generator", models_dir=models_dir)
    gpu = Generator.load(resolved, device="cuda", dtype=dtype)
    assert gpu.pipe.unet.device.type == "cuda" and gpu.pipe.unet.dtype == getattr(
        torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    )
    images = gpu.generate(seeds=[1, 2, 3, 4], scheduler="euler_a", **KW)
    again = gpu.generate(seeds=[3], scheduler="euler_a", **KW)
    cpu = Generator.load(resolved).generate(seeds=[3], scheduler="euler_a", **KW)
    a, b, c = (np.asarray(im, dtype=np.int16) for im in (images[2], again[0], cpu[0]))
    # Same seed on the GPU: equal up to batching round-off.
    assert np.abs(a - b).max() <= (2 if dtype == "fp32" else 8)
    if dtype == "fp32":
        # Versus the CPU: the noise is identical (CPU generators), so only arithmetic order separates them.
        # Half precision is not compared: random weights turn its round-off into a different picture
        # (measured on an H100: mean difference ~48 levels in fp16 and bf16).
        assert np.abs(a - c).mean() < 1.0
    assert a.std() > 5  # a picture, not a blank (NaN/overflow would give black)
    assert gpu.recipe()["device"] == "cuda" and gpu.recipe()["dtype"] == dtype


def test_cpu_offload_and_attention_slicing(models_dir: Path) -> None:
    resolved = build_and_resolve("tiny", kind="generator", models_dir=models_dir)
    gen = Generator.load(resolved, device="cuda", dtype="fp16", cpu_offload=True, attention_slicing=True)
    assert gen.recipe()["cpu_offload"] is True and gen.recipe()["attention_slicing"] is True
    assert len(gen.generate(seeds=[1, 2], scheduler=None, **KW)) == 2


def test_registry_eviction_frees_gpu_generators(models_dir: Path) -> None:
    reg = ModelRegistry(budget_bytes=1)
    tiny = build_and_resolve("tiny", kind="generator", models_dir=models_dir)
    xl = build_and_resolve("tiny-xl", kind="generator", models_dir=models_dir)
    a = reg.get("tiny", lambda: Generator.load(tiny, device="cuda"), evictable=True)
    assert estimate_bytes(a) > 0
    reg.get("tiny-xl", lambda: Generator.load(xl, device="cuda"), evictable=True)
    assert reg.loaded() == ["tiny-xl"] and reg.evicted() == ["tiny"]


def test_validator_and_scorer_on_cuda(models_dir: Path) -> None:
    clip = ClipAlignment.load(build_and_resolve("tiny-clip", kind="validator", models_dir=models_dir), "cuda")
    sims = clip.alignment([grey(64), noise(1, 64)], "a cat")
    assert all(-1.0 <= s <= 1.0 for s in sims)
    scorer = load_scorer(build_and_resolve("tiny-aesthetic", kind="scorer", models_dir=models_dir), "cuda")
    cpu = load_scorer(build_and_resolve("tiny-aesthetic", kind="scorer", models_dir=models_dir))
    images = [grey(64), noise(2, 64)]
    assert scorer.score(images, "") == pytest.approx(cpu.score(images, ""), abs=1e-3)
