"""CLIP alignment and the aesthetic scorer on their tiny presets."""

from __future__ import annotations

from pathlib import Path

import pytest
from ml_images import grey, noise, skin_ellipse

from farm.ml.builds import build_and_resolve
from farm.ml.scoring import AestheticScorer, Scorer, load_scorer
from farm.ml.validation import ClipAlignment


@pytest.fixture(scope="module")
def clip(models_dir: Path) -> ClipAlignment:
    return ClipAlignment.load(build_and_resolve("tiny-clip", kind="validator", models_dir=models_dir))


@pytest.fixture(scope="module")
def aesthetic(models_dir: Path) -> AestheticScorer:
    return AestheticScorer.load(build_and_resolve("tiny-aesthetic", kind="scorer", models_dir=models_dir))


def test_alignment_is_cosine_and_depends_on_prompt(clip: ClipAlignment) -> None:
    images = [skin_ellipse(64), grey(64), noise(1, 64)]
    cat = clip.alignment(images, "a photo of a cat")
    car = clip.alignment(images, "an old red car on the beach")
    assert len(cat) == 3 and all(isinstance(x, float) and -1.0 <= x <= 1.0 for x in cat + car)
    assert cat != car
    assert clip.alignment([], "x") == []


def test_alignment_is_batched_consistently(clip: ClipAlignment) -> None:
    images = [skin_ellipse(64), noise(2, 64)]
    together = clip.alignment(images, "a dog")
    alone = clip.alignment(images[1:], "a dog")
    assert together[1] == pytest.approx(alone[0], abs=1e-5)


def test_attribute_margins(clip: ClipAlignment) -> None:
    rows = clip.attributes([grey(64), noise(3, 64)], ["red", "a dog"])
    assert len(rows) == 2 and all(set(r) == {"red", "a dog"} for r in rows)
    assert all(-2.0 <= m <= 2.0 for r in rows for m in r.values())
    assert rows[0] != rows[1]
    assert clip.attributes([grey(64)], []) == [{}]


def test_aesthetic_scores_differ_and_are_deterministic(aesthetic: AestheticScorer, models_dir: Path) -> None:
    images = [skin_ellipse(64), grey(64), noise(4, 64), noise(5, 64)]
    first = aesthetic.score(images, "ignored")
    assert len(set(round(s, 6) for s in first)) == 4
    assert aesthetic.score(images, "another prompt") == first
    reloaded = load_scorer(build_and_resolve("tiny-aesthetic", kind="scorer", models_dir=models_dir))
    assert isinstance(reloaded, Scorer) and isinstance(reloaded, AestheticScorer)
    assert reloaded.score(images, "") == pytest.approx(first, abs=1e-6)


def test_load_scorer_rejects_unknown_folder(models_dir: Path) -> None:
    clip_folder = build_and_resolve("tiny-clip", kind="validator", models_dir=models_dir)
    as_scorer = build_and_resolve(clip_folder.path_or_id, kind="scorer", models_dir=models_dir)
    with pytest.raises(ValueError, match="no scorer implementation"):
        load_scorer(as_scorer)
