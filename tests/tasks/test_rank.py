"""farm.rank run again on an item that is already closed, after a real batch through the shared workers.

A second rank is normal: a chord whose slice was re-sent by the reaper still fires when the original message
comes back after the visibility timeout, and a rank redelivered after its commit (its worker died before the
ack) runs again. It must leave the item as the first rank left it.
"""

from __future__ import annotations

import pytest

from farm.tasks.rank import rank_item
from tests.tasks.test_end_to_end import _rows

pytestmark = pytest.mark.slow

MANIFEST = """
name: rank-again
model: tiny
defaults: {candidates: 3, steps: 2, size: 64x64, seed: 11}
selection: {winners: 1, min_accepted: 1, max_topup_rounds: 1}
items:
  - a red fox in the snow
  - a lighthouse at dusk
"""


def _snapshot(settings, batch_id: str) -> tuple:
    batch, items, cands = _rows(settings, batch_id)
    return (
        (batch.status, batch.items_done, batch.candidates_total),
        [(it.id, it.status, it.rounds, it.winners) for it in items],
        [(c.id, c.status, c.rank, c.is_winner, c.score) for c in cands],
    )


def test_a_rank_delivered_again_after_its_item_closed_keeps_ranks_winners_and_rounds(settings, run_batch):
    batch_id = run_batch(MANIFEST)
    before = _snapshot(settings, batch_id)
    (_, items, cands) = before
    assert any(winners for *_, winners in items), "the seeded tiny models pass some candidates"
    assert any(is_winner for *_, is_winner, _score in cands)

    for item_id, *_ in items:
        # The task's own code, run here on the farm's database (Task.apply), as a redelivery would run it.
        out = rank_item.apply(args=(item_id,)).get()
        assert out["item"] == item_id and not out.get("topup_round"), out

    assert _snapshot(settings, batch_id) == before
