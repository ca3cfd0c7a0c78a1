"""Where images live: FARM_HOME/artifacts/<batch>/<candidate>.png, with a JSON sidecar beside each.

Names are derived from deterministic candidate ids, and every file is written to a temporary name and
renamed into place, so a redelivered task rewrites the same file once and a crash never leaves half an image.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin


class ArtifactPathError(ValueError):
    """A path asked for lies outside the artifact store."""


def candidate_png(root: Path, batch_id: str, candidate_id: str) -> Path:
    return root / batch_id / f"{candidate_id}.png"


def _atomic_write(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(image: Image.Image, path: Path, recipe: dict[str, Any]) -> None:
    """Write the image with its recipe as PNG text, and the same recipe as a JSON sidecar."""
    info = PngImagePlugin.PngInfo()
    text = json.dumps(recipe, sort_keys=True)
    info.add_text("farm:recipe", text)
    info.add_text("parameters", text)
    _atomic_write(path, lambda fh: image.save(fh, format="PNG", pnginfo=info))
    _atomic_write(path.with_suffix(".json"), lambda fh: fh.write((text + "\n").encode()))


def read_recipe(path: Path) -> dict[str, Any]:
    with Image.open(path) as im:
        return json.loads(im.text["farm:recipe"])


def resolve_inside(root: Path, relative: str) -> Path:
    """``root/relative``, refusing anything that escapes the store (``..``, absolute paths, links out)."""
    root = root.resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise ArtifactPathError(f"{relative!r} is outside the artifact store")
    return target
