"""The documents a newcomer starts from say what the code does: the state diagrams in docs/ARCHITECTURE.md are
drawn from farm.states, so a change to the statuses or their transitions that leaves the document behind fails
here, printing the diagram to paste."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import pytest

from farm.states import (
    BATCH_CLOSED,
    CANDIDATE_FINAL,
    INITIAL,
    ITEM_CLOSED,
    TRANSITIONS,
    BatchStatus,
    CandidateStatus,
    ItemStatus,
)

ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURE.md"
#: Where a row of each kind ends (the diagram's final state); a retry may still reopen some of them.
ENDS = {BatchStatus: BATCH_CLOSED, ItemStatus: ITEM_CLOSED, CandidateStatus: CANDIDATE_FINAL}


def state_diagram(kind: type[StrEnum]) -> str:
    """A Mermaid state diagram of ``kind``'s statuses and every transition in farm.states.TRANSITIONS."""
    order = list(kind)
    lines = ["```mermaid", "stateDiagram-v2", f"    [*] --> {INITIAL[kind]}"]
    for old in order:
        for new in sorted(TRANSITIONS[kind].get(old, ()), key=order.index):
            lines.append(f"    {old} --> {new}")
    lines += [f"    {status} --> [*]" for status in ENDS[kind]]
    return "\n".join([*lines, "```"])


@pytest.mark.parametrize("kind", [BatchStatus, ItemStatus, CandidateStatus], ids=lambda k: k.__name__)
def test_the_architecture_document_draws_each_state_machine_as_farm_states_defines_it(kind):
    diagram = state_diagram(kind)
    assert diagram in ARCHITECTURE.read_text(), f"paste into docs/ARCHITECTURE.md:\n{diagram}"


def test_a_diagram_names_every_status_and_transition_of_its_kind():
    diagram = state_diagram(CandidateStatus)
    assert all(f" {s} " in diagram or f" {s}\n" in diagram for s in CandidateStatus)
    edges = sum(len(v) for v in TRANSITIONS[CandidateStatus].values())
    assert diagram.count(" --> ") == 1 + edges + len(CANDIDATE_FINAL)
