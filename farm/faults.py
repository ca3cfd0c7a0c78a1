"""Fault injection for reliability tests and drills, off unless FARM_FAULTS=1 is set in the worker.

A prompt carries the fault: ``[[fault:STAGE:ACTION:INDEX]]`` makes STAGE (generate, moderate, validate, score)
act when it works on candidate INDEX of that item (``*``: any):

- ``raise``: raise an error (every delivery);
- ``kill``: SIGKILL its own process (every delivery: poison input);
- ``sleep``: sleep FARM_FAULT_SLEEP_S (default 30) on the first delivery only, a window to kill it in.

STAGE ``rank`` (INDEX ``*``) acts inside rank's database transaction. FARM_FAULT_SLOW_GENERATE=SECONDS makes a
worker's generate slower (a slower device), FARM_FAULT_SLOW_LOAD=SECONDS its model preload. The fault fires
inside the real stage, so what follows (isolation of the failing candidate, requeue after a lost worker, the
attempt cap) is the production code path.
"""

from __future__ import annotations

import os
import re
import signal
import time

_MARK = re.compile(r"\[\[fault:(generate|moderate|validate|score|rank):(raise|kill|sleep):(\d+|\*)\]\]")


class InjectedFault(RuntimeError):
    """The error a ``raise`` fault throws."""


def enabled() -> bool:
    return os.environ.get("FARM_FAULTS") == "1"


def trigger(stage: str, prompt: str, indexes: list[int], *, attempt: int = 1) -> None:
    if not enabled():
        return
    slow = os.environ.get("FARM_FAULT_SLOW_GENERATE")
    if slow and stage == "generate":
        time.sleep(float(slow))
    if "[[fault:" not in prompt:
        return
    for m_stage, action, which in _MARK.findall(prompt):
        if m_stage != stage or not (which == "*" or int(which) in indexes):
            continue
        if action == "raise":
            raise InjectedFault(f"injected fault in {stage} for candidate {which}")
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "sleep" and attempt == 1:
            time.sleep(float(os.environ.get("FARM_FAULT_SLEEP_S", "30")))


def slow_load() -> None:
    seconds = os.environ.get("FARM_FAULT_SLOW_LOAD")
    if enabled() and seconds:
        time.sleep(float(seconds))
