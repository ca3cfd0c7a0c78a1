"""ModelRegistry: load once per key, LRU eviction under a byte budget, thread safety."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from farm.ml.builds import build_and_resolve
from farm.ml.generator import Generator
from farm.ml.registry import ModelRegistry, estimate_bytes


def test_loads_once_per_key() -> None:
    reg = ModelRegistry()
    made: list[int] = []

    def loader() -> torch.nn.Module:
        made.append(1)
        return torch.nn.Linear(4, 4)

    first = reg.get("a", loader)
    assert reg.get("a", loader) is first
    assert reg.loads() == {"a": 1} and reg.loaded() == ["a"] and len(made) == 1


def test_concurrent_gets_load_once() -> None:
    reg = ModelRegistry()

    def slow() -> object:
        time.sleep(0.05)
        return object()

    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(reg.get("m", slow))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reg.loads() == {"m": 1} and len({id(r) for r in results}) == 1


def test_estimate_bytes_of_module_and_generator(tiny_generator: Generator) -> None:
    assert estimate_bytes(torch.nn.Linear(10, 10)) == (100 + 10) * 4
    size = estimate_bytes(tiny_generator)
    expected = sum(
        sum(p.numel() * p.element_size() for p in m.parameters())
        for m in (tiny_generator.pipe.unet, tiny_generator.pipe.vae, tiny_generator.pipe.text_encoder)
    )
    assert expected <= size < expected * 1.1
    assert estimate_bytes("not a model") == 0


def test_lru_eviction_order() -> None:
    def linear() -> torch.nn.Module:
        return torch.nn.Linear(16, 16)  # 272 params * 4 bytes = 1088 bytes

    reg = ModelRegistry(budget_bytes=3 * 1088)
    reg.get("validator", linear)  # not evictable, not counted
    for key in ("g1", "g2", "g3"):
        reg.get(key, linear, evictable=True)
    reg.get("g1", linear, evictable=True)  # touch: g2 is now least recently used
    reg.get("g4", linear, evictable=True)
    assert reg.evicted() == ["g2"]
    reg.get("g5", linear, evictable=True)
    assert reg.evicted() == ["g2", "g3"]
    assert reg.loaded() == ["validator", "g1", "g4", "g5"]
    assert reg.bytes_used() == 3 * 1088
    reg.get("g2", linear, evictable=True)  # reloaded after eviction
    assert reg.loads()["g2"] == 2 and reg.loads()["validator"] == 1


def test_oversized_model_is_still_kept() -> None:
    reg = ModelRegistry(budget_bytes=10)
    reg.get("small", lambda: torch.nn.Linear(1, 1), evictable=True)
    big = reg.get("big", lambda: torch.nn.Linear(64, 64), evictable=True)
    assert reg.loaded() == ["big"] and reg.get("big", lambda: None) is big


def test_registry_caches_real_generator(models_dir: Path) -> None:
    reg = ModelRegistry(budget_bytes=None)
    resolved = build_and_resolve("tiny", kind="generator", models_dir=models_dir)
    key = f"generator:{resolved.fingerprint}"
    a = reg.get(key, lambda: Generator.load(resolved), evictable=True)
    b = reg.get(key, lambda: Generator.load(resolved), evictable=True)
    assert a is b and reg.loads() == {key: 1} and reg.bytes_used() == estimate_bytes(a)
