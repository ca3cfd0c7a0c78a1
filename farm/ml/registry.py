"""ModelRegistry: a process-local cache so a worker loads each model once, never per task.

Why: loading a checkpoint costs seconds to minutes while a task takes milliseconds to seconds; the generate,
validate and score tasks of one worker all ask the registry. Models counted against the byte budget (the
generators, which are the big ones) are evicted least-recently-used first when a new one would not fit;
the others (validators, scorers, moderation layers) stay. Load counts make "loaded once" testable.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def estimate_bytes(model: Any) -> int:
    """Rough memory of a model from its parameters and buffers.

    Accepts a torch module, a diffusers pipeline (sums its module components), or any object with a ``pipe``
    or ``model`` attribute holding one (the farm's adapters). Unknown objects count as 0.
    """
    import torch

    seen: set[int] = set()

    def module_bytes(module: torch.nn.Module) -> int:
        total = 0
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
        return total

    def walk(obj: Any, depth: int) -> int:
        if depth > 3 or obj is None:
            return 0
        if isinstance(obj, torch.nn.Module):
            return module_bytes(obj)
        components = getattr(obj, "components", None)
        if isinstance(components, dict):
            return sum(walk(c, depth + 1) for c in components.values())
        total = 0
        for attr in ("pipe", "model", "vision", "head"):
            if hasattr(obj, attr):
                total += walk(getattr(obj, attr), depth + 1)
        return total

    return walk(model, 0)


class ModelRegistry:
    """Thread-safe get-or-load cache keyed by string, with LRU eviction of budgeted entries.

    ``budget_bytes`` bounds the total size of entries fetched with ``evictable=True`` (generators); None means
    unbounded. A newly loaded evictable model is always kept, even if it alone exceeds the budget: a worker
    must be able to run its one model.
    """

    def __init__(
        self, *, budget_bytes: int | None = None, sizer: Callable[[Any], int] = estimate_bytes
    ) -> None:
        self.budget_bytes = budget_bytes
        self._sizer = sizer
        self._lock = threading.RLock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._loads: dict[str, int] = {}
        self._evicted: list[str] = []

    def get(self, key: str, loader: Callable[[], T], *, evictable: bool = False) -> T:
        """Return the cached model for ``key``, calling ``loader`` only on first use (or after eviction).

        Concurrent requests for the same key wait for one load; different keys load in parallel.
        """
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
            value = loader()
            size = self._sizer(value) if evictable else 0
            with self._lock:
                self._loads[key] = self._loads.get(key, 0) + 1
                if evictable:
                    self._make_room(size, keep=key)
                    self._sizes[key] = size
                self._items[key] = value
                self._items.move_to_end(key)
            return value

    def _make_room(self, incoming: int, *, keep: str) -> None:
        if self.budget_bytes is None:
            return
        while self._sizes and sum(self._sizes.values()) + incoming > self.budget_bytes:
            victim = next(k for k in self._items if k in self._sizes and k != keep)
            self._drop(victim)

    def _drop(self, key: str) -> None:
        self._items.pop(key, None)
        self._sizes.pop(key, None)
        self._evicted.append(key)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            # Hand the freed blocks back so the next model's load sees them (only matters on a GPU).
            torch.cuda.empty_cache()

    def evict(self, key: str) -> bool:
        """Drop ``key`` from the cache; returns whether it was there."""
        with self._lock:
            if key not in self._items:
                return False
            self._drop(key)
            return True

    def loads(self) -> dict[str, int]:
        """How many times each key's loader has run in this process."""
        with self._lock:
            return dict(self._loads)

    def loaded(self) -> list[str]:
        """Keys currently cached, least recently used first."""
        with self._lock:
            return list(self._items)

    def evicted(self) -> list[str]:
        """Keys evicted so far, in eviction order."""
        with self._lock:
            return list(self._evicted)

    def bytes_used(self) -> int:
        """Estimated bytes of the budgeted (evictable) entries now cached."""
        with self._lock:
            return sum(self._sizes.values())
