"""A batch's winners as one zip: each winning image with a JSON sidecar at the same path (``.json``), plus the
batch record and the manifest it came from."""

from __future__ import annotations

import json
import tempfile
import zipfile
from typing import IO, Any

from sqlalchemy.orm import Session

from farm.artifacts import ArtifactPathError, ArtifactStore
from farm.db import Batch
from farm.views import batch_dict, candidate_dict
from web.readers import winners


def winners_zip(s: Session, batch: Batch, store: ArtifactStore) -> IO[bytes]:
    """Write the zip to a temporary file (spilled to disk when large) and return it rewound."""
    out = tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024)  # noqa: SIM115 - returned to the caller
    missing: list[str] = []
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("batch.json", json.dumps(batch_dict(s, batch, with_items=False), indent=2) + "\n")
        zf.writestr("manifest.yaml", batch.manifest_yaml or "")
        for item, cand in winners(s, batch.id):
            stem = f"winners/{item.index:05d}-{cand.rank or 0:02d}-{cand.id}"
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
            zf.writestr("MISSING.txt", "winners whose image file is not in the artifact store:\n"
                        + "\n".join(missing) + "\n")
    out.seek(0)
    return out


def _image(store: ArtifactStore, rel: str | None) -> bytes | None:
    if not rel:
        return None
    try:
        return store.read_bytes(rel)
    except (ArtifactPathError, OSError):
        return None
