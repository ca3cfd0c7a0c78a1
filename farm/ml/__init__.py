"""Model adapters: tiny presets, generators (diffusers), moderation layers, validators, scorers, a cache.

Only this package (and farm.gpu_pinning) imports torch; it takes plain typed arguments and knows nothing of
Flask, Celery, SQL or the manifest. Submodules are imported explicitly (``from farm.ml.generator import
Generator``) so that importing ``farm.ml`` stays cheap.

Importing this package also installs a one-shot import hook for ``torchvision``: the torchvision build that
image-reward pulls in cannot load its C++ extension next to the CPU torch, and then breaks every later
``import torchvision`` (and with it diffusers and transformers image processors) unless two operator
signatures are declared first. The hook runs ``farm.ml.compat_imagereward.declare_torchvision_ops`` just
before the first torchvision import of the process, whoever triggers it, and costs nothing until then (no
torch import here). See that module for the full story.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType


class _TorchvisionOpsHook(importlib.abc.MetaPathFinder):
    """Finds nothing; at the first lookup of ``torchvision`` it declares the missing ops, then retires."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision":
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            from farm.ml.compat_imagereward import declare_torchvision_ops

            declare_torchvision_ops()
        return None


if "torchvision" not in sys.modules and not any(isinstance(f, _TorchvisionOpsHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TorchvisionOpsHook())
