"""A batch's winners as one zip: each winning image with a JSON sidecar at the same path (``.json``), plus the
batch record and the manifest it came from.

Each winner's path comes from the export name template (FARM_EXPORT_NAME, checked in farm.config; the fields
and the sanitiser are farm.filenames'): by default ``<batch>/<item>-<prompt, 40 characters>-<seed>``, so the
files sort by item and say what they show. Prompts are user text, so every field is made safe for any
file system, and two winners that would share a name (the same prompt and seed in one item, or names that
differ only in case) get ``-2``, ``-3``... The sidecar always sits beside its image, with the same stem.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from typing import IO, Any

from sqlalchemy.orm import Session

from farm.artifacts import ArtifactPathError, ArtifactStore
from farm.db import Batch, Candidate, Item
from farm.filenames import DEFAULT_EXPORT_NAME, NameTemplate, unique
from farm.infotext import model_name
from farm.views import batch_dict, candidate_dict
from web.readers import winners

#: The files the zip holds beside the winners, which no winner's files may replace.
FIXED_FILES = ("batch.json", "manifest.yaml", "MISSING.txt")


def export_fields(batch: Batch, item: Item, cand: Candidate) -> dict[str, Any]:
    """The values of the template's fields (farm.filenames.FIELDS) for one winner."""
    recipe = cand.recipe or {}
    return {
        "batch": batch.id,
        "batch_name": batch.name,
        "item": item.index,
        "candidate": cand.id,
        "index": cand.index,
        "prompt": item.prompt,
        "seed": cand.seed,
        "model": model_name(recipe.get("model_ref") or batch.model) or "",
        "rank": cand.rank or 0,
    }


def winners_zip(
    s: Session, batch: Batch, store: ArtifactStore, *, names: str = DEFAULT_EXPORT_NAME
) -> IO[bytes]:
    """Write the zip to a temporary file (spilled to disk when large) and return it rewound; ``names`` is the
    export name template (the settings' ``export_name``)."""
    template = NameTemplate(names)
    taken = {name.casefold() for name in FIXED_FILES}
    out = tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024)  # noqa: SIM115 - returned to the caller
    missing: list[str] = []
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("batch.json", json.dumps(batch_dict(s, batch, with_items=False), indent=2) + "\n")
        zf.writestr("manifest.yaml", batch.manifest_yaml or "")
        for item, cand in winners(s, batch.id):
            stem = unique(template.render(export_fields(batch, item, cand)), taken)
            sidecar: dict[str, Any] = {
                "batch": batch.id,
                "item": {"id": item.id, "index": item.index, "prompt": item.prompt, "source": item.source},
                "candidate": candidate_dict(cand),
                "recipe": cand.recipe,
            }
            image = _image(store, cand.image_path)
            if image is None:
                missing.append(cand.id)
                sidecar["missing_image"] = True
            else:
                zf.writestr(f"{stem}.png", image, compress_type=zipfile.ZIP_STORED)
            zf.writestr(f"{stem}.json", json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        if missing:
            zf.writestr(
                "MISSING.txt",
                "winners whose image file is not in the artifact store:\n" + "\n".join(missing) + "\n",
            )
    out.seek(0)
    return out


def _image(store: ArtifactStore, rel: str | None) -> bytes | None:
    if not rel:
        return None
    try:
        return store.read_bytes(rel)
    except (ArtifactPathError, OSError):
        return None
