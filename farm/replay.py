"""Replay: regenerate one candidate from the recipe stored in its PNG and say whether the pixels match.

Why: every candidate carries its full recipe (model reference and folder fingerprint, pipeline and scheduler,
dtype, seed, prompt, all parameters) so that a result can be audited or reproduced later. Replay is the proof:
it resolves the same model, refuses when the model's files are no longer the ones recorded (a different
folder content would make any comparison meaningless), regenerates, and compares pixels.

Identical means bitwise equal, and on the recording host it is: a candidate is made in a batched slice, and
float sums over a batch of another size round differently (one uint8 level in a few values on a CPU), so the
recipe records what decides the numerics (the slice's seeds in order and the candidate's position in it,
torch's thread count, the CPU kernel level or GPU name, precision flags, device, dtype, package versions) and
replay regenerates that whole slice in the same order under the same thread count and flags, on the recorded
device when this host has one, and takes the candidate's image from it. On another host the result notes
what differs (device, GPU, CPU kernel level, versions): those explain a difference. A recipe written before
the slice was recorded is replayed from its seed alone, with a note that round-off may then differ; the
largest difference and the share of differing values are reported for the caller to judge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from farm import artifacts

#: Recipe keys replay cannot do without.
REQUIRED_KEYS = ("model_ref", "fingerprint", "seed", "prompt", "steps", "guidance", "width", "height")


class ReplayError(ValueError):
    """The candidate cannot be replayed: no recipe, an incomplete one, or a model that changed since."""


@dataclass(frozen=True)
class ReplayResult:
    """How a regenerated candidate compares with the stored one.

    ``max_abs_diff`` is the largest per-channel difference in uint8 levels (255 when the sizes differ);
    ``differing_fraction`` the share of channel values that differ at all; ``notes`` what differs between
    the recording host and this one (device, GPU, CPU kernel level, package versions), or that the recipe
    predates slice recording; ``replayed`` how the regeneration ran (its slice seeds and numerics).
    """

    identical: bool
    max_abs_diff: int
    differing_fraction: float
    recipe: dict[str, Any]
    notes: tuple[str, ...] = field(default=())
    replayed: dict[str, Any] = field(default_factory=dict)


def read_recipe(candidate_png: Path) -> dict[str, Any]:
    """The recipe from the PNG's ``farm:recipe`` text chunk (read by farm.artifacts.read_recipe, the one
    reader of that chunk), checked for what replay needs."""
    path = Path(candidate_png)
    try:
        recipe = artifacts.read_recipe(path)
    except artifacts.RecipeError as exc:
        raise ReplayError(str(exc)) from exc
    missing = [key for key in REQUIRED_KEYS if key not in recipe]
    if missing:
        raise ReplayError(f"{path}: the recipe lacks {', '.join(missing)}")
    return recipe


def _resolve(recipe: dict[str, Any], models_dir: Path) -> Any:
    """Resolve the recorded model the way it was resolved then, and insist on the same fingerprint.

    A preset is resolved by name (tiny ones are rebuilt, deterministically, under ``models_dir``); a folder
    or hub model by the absolute path or id recorded, since the manifest's own reference may have been
    relative to a folder this process does not know.
    """
    from farm.ml.builds import build_and_resolve
    from farm.ml.presets import ModelRefError

    source = recipe.get("model_source")
    ref = recipe["model_ref"]
    if source not in (None, "preset") and recipe.get("model_path_or_id"):
        ref = recipe["model_path_or_id"]
    try:
        resolved = build_and_resolve(str(ref), kind="generator", models_dir=Path(models_dir))
    except ModelRefError as exc:
        raise ReplayError(f"cannot replay: the recorded model is not available here: {exc}") from exc
    if resolved.fingerprint != recipe["fingerprint"]:
        raise ReplayError(
            f"cannot replay: model {recipe['model_ref']!r} at {resolved.path_or_id} has fingerprint "
            f"{resolved.fingerprint}, but the candidate was made with {recipe['fingerprint']}; the model's "
            "files changed since, so its pixels could not be expected to match"
        )
    return resolved


def slice_of(recipe: dict[str, Any]) -> tuple[list[int], int]:
    """(the seeds of the candidate's slice in generation order, the candidate's position in it).

    A recipe from before slices were recorded gives its seed alone; one whose seed is not the slice's seed at
    its position contradicts itself and is refused."""
    seed = int(recipe["seed"])
    if "slice_seeds" not in recipe:
        return [seed], 0
    seeds, position = recipe["slice_seeds"], recipe.get("slice_position")
    if (
        not isinstance(seeds, list)
        or not all(isinstance(s, int) for s in seeds)
        or not isinstance(position, int)
        or not 0 <= position < len(seeds)
    ):
        raise ReplayError(
            f"cannot replay: the recipe's slice_seeds {seeds!r} and slice_position {position!r} "
            "do not name a position in a list of seeds"
        )
    if seeds[position] != seed:
        raise ReplayError(
            f"cannot replay: the recipe's seed {seed} is not the seed at its slice position {position} "
            f"({seeds[position]}); the recipe was edited"
        )
    return list(seeds), position


def _notes(recipe: dict[str, Any], replayed: dict[str, Any]) -> tuple[str, ...]:
    notes = []
    if "slice_seeds" not in recipe:
        notes.append(
            "the recipe predates slice recording (no slice seeds, batch size or thread count): the seed was "
            "regenerated alone, so a candidate made in a batched slice may differ by round-off"
        )
    # The fingerprint (configs, file sizes) matched, or replay would have stopped; the hash reads the weights.
    if recipe.get("model_hash") and replayed.get("model_hash") not in (None, recipe["model_hash"]):
        notes.append(
            f"model hash {recipe['model_hash']} recorded, {replayed['model_hash']} now: the weights differ"
        )
    if recipe.get("pipeline_class") and recipe["pipeline_class"] != replayed["pipeline_class"]:
        notes.append(f"pipeline class {recipe['pipeline_class']} recorded, {replayed['pipeline_class']} now")
    if recipe.get("scheduler_class") and recipe["scheduler_class"] != replayed["scheduler_class"]:
        notes.append(f"scheduler {recipe['scheduler_class']} recorded, {replayed['scheduler_class']} now")
    if recipe.get("device") and recipe["device"] != replayed["device"]:
        notes.append(f"made on {recipe['device']}, replayed on {replayed['device']}")
    made, now = recipe.get("numerics") or {}, replayed.get("numerics") or {}
    for key, what in (
        ("device_name", "GPU"),
        ("cpu_capability", "CPU kernel level"),
        ("torch_threads", "torch threads"),
        ("matmul_precision", "float32 matmul precision"),
        ("deterministic_algorithms", "deterministic algorithms"),
    ):
        if key in made and made[key] != now.get(key):
            notes.append(f"{what} {made[key]} recorded, {now.get(key, 'none')} now")
    recorded = recipe.get("versions") or {}
    for name, version in sorted(replayed.get("versions", {}).items()):
        if name in recorded and recorded[name] != version:
            notes.append(f"{name} {recorded[name]} recorded, {version} now")
    return tuple(notes)


def compare_pixels(stored: Image.Image, regenerated: Image.Image) -> tuple[int, float]:
    """(largest absolute difference in uint8 levels, fraction of differing channel values) of two images."""
    a = np.asarray(stored.convert("RGB"), dtype=np.int16)
    b = np.asarray(regenerated.convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        return 255, 1.0
    diff = np.abs(a - b)
    if diff.size == 0:
        return 0, 0.0
    return int(diff.max()), float((diff > 0).mean())


def replay(candidate_png: Path, *, models_dir: Path, device: str | None = None) -> ReplayResult:
    """Regenerate the candidate in ``candidate_png`` from its recipe and compare pixels.

    The candidate's whole slice is regenerated in its recorded order, under its recorded torch thread count
    and precision flags (this process's own are restored afterwards), on ``device``: by default the
    recorded one where this host has it, else the CPU. Raises ``ReplayError`` when the PNG has no usable
    recipe or when the model's fingerprint differs from the recorded one.
    """
    from farm.ml.generator import Generator, numerics_as, replay_device

    recipe = read_recipe(Path(candidate_png))
    seeds, position = slice_of(recipe)
    resolved = _resolve(recipe, Path(models_dir))
    generator = Generator.load(
        resolved,
        device=device or replay_device(recipe.get("device")),
        dtype=str(recipe.get("dtype", "fp32")),
        attention_slicing=bool(recipe.get("attention_slicing", False)),
        cpu_offload=bool(recipe.get("cpu_offload", False)),
    )
    with numerics_as(recipe.get("numerics")):
        images = generator.generate(
            prompt=str(recipe["prompt"]),
            negative_prompt=str(recipe.get("negative_prompt") or ""),
            seeds=seeds,
            steps=int(recipe["steps"]),
            guidance=float(recipe["guidance"]),
            width=int(recipe["width"]),
            height=int(recipe["height"]),
            scheduler=recipe.get("scheduler"),
        )
    with Image.open(candidate_png) as stored:
        max_abs_diff, fraction = compare_pixels(stored, images[position])
    replayed = generator.recipe()
    return ReplayResult(
        identical=max_abs_diff == 0,
        max_abs_diff=max_abs_diff,
        differing_fraction=fraction,
        recipe=recipe,
        notes=_notes(recipe, replayed),
        replayed=replayed,
    )
