"""The presets the farm builds itself (tiny ones, random-sdxl), each built once per models folder.

Why apart from farm.ml.presets: resolving a reference must stay cheap and free of torch (manifest validation
and the doctor use it), while building a preset imports the model libraries and writes weights. So the
decision to build is the caller's: a worker or a replay calls ``build_and_resolve``, which builds what the
reference needs and then resolves it with ``farm.ml.presets.resolve_model``, which never builds.

A build goes into a temporary sibling folder and is then renamed into place in one step, so a crash never
leaves half a model and two processes racing to build it both end up with one complete copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from farm.ml.layout import TINY_FOLDERS, TINY_MARKERS
from farm.ml.presets import ResolvedModel, presets_to_build, resolve_model


def _builder(name: str) -> Callable[[Path], Path]:
    """The function that writes preset ``name``; imported on first build, since the builders import torch."""
    from farm.ml import fullsize, tiny

    builders: dict[str, Callable[[Path], Path]] = {
        "tiny": tiny.build_tiny_sd,
        "tiny-xl": tiny.build_tiny_sdxl,
        "tiny-clip": tiny.build_tiny_clip,
        "tiny-aesthetic": tiny.build_tiny_aesthetic,
        "tiny-image-reward": tiny.build_tiny_image_reward,
        "random-sdxl": fullsize.build_random_sdxl,
    }
    return builders[name]


def _ensure(models_dir: Path, name: str, builder: Callable[[Path], Path]) -> Path:
    """Build ``name`` once under ``models_dir``; atomic and safe when several processes race."""
    models_dir = Path(models_dir)
    target = models_dir / TINY_FOLDERS[name]
    marker = TINY_MARKERS[name]
    if (target / marker).is_file():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models_dir))
    try:
        builder(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process won the race (target exists and is not empty): keep theirs, drop ours.
            if not (target / marker).is_file():
                raise RuntimeError(
                    f"{target} is not a complete {name!r} model (no {marker}); remove it to rebuild"
                ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_preset(name: str, models_dir: Path) -> Path:
    """Return the folder of the built-here preset ``name`` under ``models_dir``, building it on first use."""
    if name not in TINY_FOLDERS:
        raise ValueError(f"{name!r} is not a preset the farm builds; those are {', '.join(TINY_FOLDERS)}")
    return _ensure(models_dir, name, _builder(name))


def build_and_resolve(ref: str, *, kind: str, models_dir: Path) -> ResolvedModel:
    """``resolve_model`` after building, under ``models_dir``, the preset ``ref`` needs if the farm builds it.

    Raises ``ModelRefError`` as ``resolve_model`` does for an unusable reference (and then builds nothing).
    """
    for name in presets_to_build(ref, kind):
        ensure_preset(name, models_dir)
    return resolve_model(ref, kind=kind, models_dir=models_dir)
