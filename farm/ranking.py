"""Ranking an item's candidates: a weighted composite over those that passed, winners never near-duplicates.

Pure functions over plain values, so the rule is tested without workers; the rank task feeds it from SQL.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Contender:
    id: str
    index: int
    preference: float | None
    alignment: float | None
    pdq_hash: str | None


@dataclass(frozen=True)
class Ranking:
    order: list[str]  # best first
    winners: list[str]
    scores: dict[str, float]


def composite(c: Contender, *, preference_weight: float, alignment_weight: float) -> float:
    return preference_weight * (c.preference or 0.0) + alignment_weight * (c.alignment or 0.0)


def _distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def rank(
    contenders: list[Contender],
    *,
    preference_weight: float,
    alignment_weight: float,
    winners: int,
    near_duplicate_distance: int,
) -> Ranking:
    """Order by composite score, highest first; ties go to the lower candidate index (deterministic).

    Winners are taken from the top, skipping any candidate within ``near_duplicate_distance`` of a winner
    already chosen, so two copies of one picture never both win.
    """
    scores = {
        c.id: round(composite(c, preference_weight=preference_weight, alignment_weight=alignment_weight), 6)
        for c in contenders
    }
    ordered = sorted(contenders, key=lambda c: (-scores[c.id], c.index))
    chosen: list[Contender] = []
    for c in ordered:
        if len(chosen) == winners:
            break
        if c.pdq_hash and any(
            w.pdq_hash and _distance(c.pdq_hash, w.pdq_hash) <= near_duplicate_distance for w in chosen
        ):
            continue
        chosen.append(c)
    return Ranking([c.id for c in ordered], [c.id for c in chosen], scores)
