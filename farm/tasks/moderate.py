"""farm.moderate: PDQ blocklist, NudeNet, OpenNSFW and near-duplicates on a slice's images."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from celery import Task
from PIL import Image

from farm.celery_app import app
from farm.db import Candidate
from farm.records import StageStart
from farm.tasks.stage import MIDDLE_STAGE_OPTIONS, run_stage


def load_images(cands: list[Candidate]) -> list[Image.Image]:
    from farm.tasks.runtime import runtime

    return [runtime().image(c.image_path) for c in cands]


def moderate_slice(start: StageStart, cands: list[Candidate]) -> dict[str, dict[str, Any]]:
    from farm.ml import moderation as mod
    from farm.tasks.runtime import runtime

    rt = runtime()
    cfg = start.batch.settings["moderation"]
    images = load_images(cands)
    hashes = [mod.pdq_hash(im) for im in images]
    layers: list[list[mod.LayerVerdict]] = [[] for _ in cands]
    if cfg.get("pdq_blocklist"):
        blocklist = rt.blocklist(cfg["pdq_blocklist"])
        for verdicts, (h, _q) in zip(layers, hashes, strict=True):
            verdicts.append(mod.check_pdq_blocklist(h, blocklist, max_distance=cfg["pdq_max_distance"]))
    if cfg["nsfw_detector"]["enabled"]:
        found = rt.nudenet().check(images, threshold=cfg["nsfw_detector"]["threshold"])
        for verdicts, v in zip(layers, found, strict=True):
            verdicts.append(v)
    if cfg["nsfw_classifier"]["enabled"]:
        found = rt.opennsfw().check(images, threshold=cfg["nsfw_classifier"]["threshold"])
        for verdicts, v in zip(layers, found, strict=True):
            verdicts.append(v)
    pool = {
        **rt.batch_hashes(start.batch.id),
        **{c.id: h for c, (h, _q) in zip(cands, hashes, strict=True)},
    }
    limit = cfg["near_duplicate_distance"]
    out = {}
    for c, verdicts, (h, quality) in zip(cands, layers, hashes, strict=True):
        twins = sorted(o for o, other in pool.items() if o != c.id and mod.hamming(h, other) <= limit)
        if twins:
            verdicts.append(
                mod.LayerVerdict(
                    "near_duplicate",
                    "flag",
                    f"near-duplicate of {', '.join(twins[:5])}",
                    {"of": twins, "max_distance": cfg["near_duplicate_distance"]},
                )
            )
        final, reasons = mod.combine(verdicts)
        out[c.id] = {
            "status": "moderated" if final == "passed" else "rejected",
            "verdict": final,
            "reasons": reasons,
            "moderation": [asdict(v) for v in verdicts],
            "pdq_hash": h,
            "attributes": {"pdq_quality": quality},
        }
    return out


@app.task(name="farm.moderate", **MIDDLE_STAGE_OPTIONS)
def moderate(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Idempotent: reads the slice's images and writes verdicts only onto candidates still at 'generated'."""
    return run_stage(self, payload, "moderate", moderate_slice)
