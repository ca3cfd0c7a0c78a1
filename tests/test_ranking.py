"""The ranking rule on plain values: composite order, deterministic ties, near-duplicates never both win."""

from __future__ import annotations

from farm.ranking import Contender, rank

A = "0" * 64
A_TWIN = "0" * 63 + "1"  # 1 bit away
B = "f" * 64


def test_candidates_are_ordered_by_the_weighted_composite():
    cs = [
        Contender("x", 0, 1.0, 0.1, None),
        Contender("y", 1, 0.5, 0.9, None),
        Contender("z", 2, 0.2, 0.2, None),
    ]
    r = rank(cs, preference_weight=1.0, alignment_weight=1.0, winners=1, near_duplicate_distance=10)
    assert r.order == ["y", "x", "z"] and r.winners == ["y"]
    assert r.scores == {"x": 1.1, "y": 1.4, "z": 0.4}
    r = rank(cs, preference_weight=1.0, alignment_weight=0.0, winners=2, near_duplicate_distance=10)
    assert r.order == ["x", "y", "z"] and r.winners == ["x", "y"]


def test_ties_go_to_the_lower_candidate_index_whatever_the_input_order():
    cs = [
        Contender("b", 3, 1.0, 0.0, None),
        Contender("a", 1, 1.0, 0.0, None),
        Contender("c", 2, 1.0, 0.0, None),
    ]
    r = rank(cs, preference_weight=1.0, alignment_weight=0.0, winners=1, near_duplicate_distance=0)
    assert r.order == ["a", "c", "b"] and r.winners == ["a"]


def test_a_near_duplicate_of_a_winner_never_also_wins():
    cs = [
        Contender("top", 0, 3.0, 0, A),
        Contender("copy", 1, 2.9, 0, A_TWIN),
        Contender("other", 2, 1.0, 0, B),
    ]
    r = rank(cs, preference_weight=1.0, alignment_weight=0.0, winners=2, near_duplicate_distance=20)
    assert r.winners == ["top", "other"]
    assert r.order == ["top", "copy", "other"], "the copy keeps its rank; it just does not win"


def test_fewer_contenders_than_winners_gives_all_of_them_and_none_gives_none():
    r = rank(
        [Contender("only", 0, 0.1, 0.1, None)],
        preference_weight=1,
        alignment_weight=1,
        winners=3,
        near_duplicate_distance=5,
    )
    assert r.winners == ["only"]
    assert (
        rank([], preference_weight=1, alignment_weight=1, winners=1, near_duplicate_distance=5).winners == []
    )
