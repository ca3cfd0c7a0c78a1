"""File formats the farm reads in more than one place, each read by one function here.

Why one module: a manifest is validated in the web process or the CLI and run later by a worker. When the
check at validation and the reader at run time are two pieces of code, they drift, and a file that validation
accepts fails every candidate at run time (a PDQ list of ``hash,label`` lines did exactly that). So the
validator and the runtime loader both call the functions below.

Pure Python, no torch and no numpy: ``farm.manifest`` imports it, and validating a manifest stays cheap.
Messages never echo a file's contents (a line number and what would be valid), so an error shown to whoever
submitted a manifest cannot be used to read a file on the server.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "CLIP_SCORE",
    "MODEL_FOLDER_MARKERS",
    "FormatError",
    "model_folder_problem",
    "parse_pdq_blocklist",
]

#: A PDQ hash: 256 bits as 64 hex digits. A line is the hash alone, or the hash, a separator (comma, tab or
#: spaces) and anything after it (a label, an id, a comment), as exported hash lists are usually written.
_PDQ_LINE = re.compile(r"([0-9A-Fa-f]{64})(?:[,\t ].*)?")

#: The CLIP-score scorer: ``clip-score`` scores with the default validator, ``clip-score:<validator ref>``
#: with any CLIP/SigLIP validator reference (preset, folder or hub id). It needs no model of its own. Here
#: because manifest validation (farm.manifest, no torch) and the worker (farm.ml.presets) both spell it.
CLIP_SCORE = "clip-score"

#: Files a local folder must hold (any one of them) to be a model of each kind: a diffusers pipeline for a
#: generator, a Hugging Face model for a validator, a Hugging Face model or an ImageReward checkpoint folder
#: for a scorer.
MODEL_FOLDER_MARKERS: dict[str, tuple[str, ...]] = {
    "generator": ("model_index.json",),
    "validator": ("config.json",),
    "scorer": ("config.json", "imagereward.json", "ImageReward.pt"),
}


class FormatError(ValueError):
    """A file that is not in the format expected: ``line`` (1-based, or None for the whole file) and
    ``reason``, which says what would be valid and quotes nothing from the file."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        self.reason = reason
        self.line = line
        super().__init__(f"line {line}: {reason}" if line is not None else reason)


def parse_pdq_blocklist(data: bytes) -> list[str]:
    """The hashes of a PDQ blocklist, lower-case, in file order.

    Format: one hash of 64 hex digits per line, alone or followed by a comma, a tab or spaces and anything
    (``<hash>,known-bad-image``); lines starting with ``#`` and blank lines are skipped; a UTF-8 byte order
    mark is allowed. Anything else raises ``FormatError`` with the first bad line's number.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise FormatError("not a UTF-8 text file; save the blocklist as UTF-8 text") from None
    hashes: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _PDQ_LINE.fullmatch(stripped)
        if match is None:
            raise FormatError(
                "not a PDQ hash: expected 64 hex digits, alone or followed by a comma, tab or space and a "
                "label (lines starting with # are comments)",
                number,
            )
        hashes.append(match.group(1).lower())
    return hashes


def model_folder_problem(folder: Path, kind: str) -> str | None:
    """Why ``folder`` (an existing folder) is not a saved model of ``kind``, or None when it is one.

    Used by manifest validation and by ``farm.ml.presets`` when a worker resolves the reference, so both
    agree on what a model folder is.
    """
    markers = MODEL_FOLDER_MARKERS[kind]
    if any((folder / marker).is_file() for marker in markers):
        return None
    what = "a diffusers pipeline" if kind == "generator" else f"a saved {kind} model"
    return f"is not {what}: it has no {' or '.join(markers)}"
