"""The moderate stage: PDQ blocklist, NudeNet, OpenNSFW and near-duplicates on a slice's images.

Idempotent: reads the slice's images and writes verdicts only onto candidates still at 'generated'. On a QC
worker it takes the images handed off to it and stores their PNGs, its write waiting for them. An image
found nowhere (handed off on a host that restarted) sends its candidate back to generate.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from PIL import Image
from sqlalchemy import Connection

from farm import logs, records
from farm.records import StagedCandidate, StageStart
from farm.states import CandidateStatus, CandidateVerdict
from farm.tasks.generate import settle_writes
from farm.tasks.stage import Stage

if TYPE_CHECKING:
    from farm.tasks.runtime import Runtime

log = logging.getLogger(__name__)

LOST = (
    "the image is neither stored nor handed off (the host that generated it restarted, or its handoff "
    "folder, FARM_HANDOFF_DIR, was cleared, before its QC worker stored it): generating it again"
)


def load_images(rt: Runtime, cands: list[StagedCandidate]) -> list[Image.Image]:
    """The slice's images: kept in memory by the stage before, else read from the store."""
    return [rt.images.image(c.image_path) for c in cands]


def _find(rt: Runtime, c: StagedCandidate) -> Image.Image | None:
    """Moderate's image for ``c``: handed off by the generating worker (FARM_QC=worker; its PNG is stored
    from here), in memory, in the store, or None when it is nowhere."""
    image = rt.images.take_handoff(c)
    if image is not None:
        return image
    try:
        return rt.images.image(c.image_path)
    except FileNotFoundError:
        return None


def moderate_slice(rt: Runtime, start: StageStart, cands: list[StagedCandidate]) -> dict[str, dict[str, Any]]:
    from farm.ml import moderation as mod

    models = rt.models
    cfg = start.config.moderation
    seen = {c.id: _find(rt, c) for c in cands}
    lost = [c for c in cands if seen[c.id] is None]
    if lost:
        logs.event(
            log, LOST, level=logging.WARNING, batch=start.batch.id, images=[c.image_path for c in lost]
        )
    out = {c.id: records.image_lost(c) for c in lost}
    cands = [c for c in cands if seen[c.id] is not None]
    if not cands:
        return out
    images = [seen[c.id] for c in cands]
    hashes = [mod.pdq_hash(im) for im in images]
    layers: list[list[mod.LayerVerdict]] = [[] for _ in cands]
    if cfg.pdq_blocklist:
        blocklist = models.blocklist(cfg.pdq_blocklist)
        for verdicts, (h, _q) in zip(layers, hashes, strict=True):
            verdicts.append(mod.check_pdq_blocklist(h, blocklist, max_distance=cfg.pdq_max_distance))
    if cfg.nsfw_detector.enabled:
        found = models.nudenet().check(images, threshold=cfg.nsfw_detector.threshold)
        for verdicts, v in zip(layers, found, strict=True):
            verdicts.append(v)
    if cfg.nsfw_classifier.enabled:
        found = models.opennsfw().check(images, threshold=cfg.nsfw_classifier.threshold)
        for verdicts, v in zip(layers, found, strict=True):
            verdicts.append(v)
    for c, verdicts, (h, quality) in zip(cands, layers, hashes, strict=True):
        final, reasons = mod.combine(verdicts)
        passed = final == CandidateVerdict.PASSED
        out[c.id] = {
            "status": CandidateStatus.MODERATED if passed else CandidateStatus.REJECTED,
            "verdict": final,
            "reasons": reasons,
            "moderation": [asdict(v) for v in verdicts],
            "pdq_hash": h,
            "attributes": {"pdq_quality": quality},
        }
    return out


def flag_near_duplicates(rt: Runtime, start: StageStart, conn: Connection, ids: list[str]) -> None:
    """Flag, on both sides, every candidate of the batch within the near-duplicate distance of this slice.

    Runs in the transaction that writes the slice's hashes, after them, so the flags commit with the hashes
    (a crash cannot leave hashes whose check never ran); the batch's lock, taken before the hashes are
    written (``lock_hashes``), makes of two slices moderated at the same moment on two devices the one that
    writes second always see the first.
    """
    limit = start.config.moderation.near_duplicate_distance
    pool = rt.batch_hashes(conn, start.batch.id)
    pairs = {cid: [o for o in pool.within(pool[cid], limit) if o != cid] for cid in ids if cid in pool}
    records.add_near_duplicate_flags(conn, {k: v for k, v in pairs.items() if v}, limit)


def lock_hashes(_rt: Runtime, start: StageStart, conn: Connection) -> None:
    records.lock_batch_hashes(conn, start.batch.id)


#: On a QC worker the stage starts the PNG writes of the images handed off to it; its write waits for them.
MODERATE = Stage(
    "moderate", moderate_slice, within=flag_near_duplicates, before=lock_hashes, settle=settle_writes
)
