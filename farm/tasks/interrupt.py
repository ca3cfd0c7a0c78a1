"""Stopping a slice mid-generation when its batch is cancelled, and reporting its denoising progress.

Why: a cancel (farm.dispatch.cancel) used to take effect at a slice's next stage task, so a slice that was
generating ran to its end first: a 512x512, 25-step slice on a CPU kept its batch 'cancelling' and its device
busy for over five minutes. Now the generator calls a ``StepWatch`` after every denoising step (diffusers'
``callback_on_step_end``, farm.ml.generator), which raises ``SliceCancelled`` once the batch is stopped; the
generate stage records that slice's candidates as cancelled (no image written) and its chain goes on as for
any cancel: the later stages find the batch stopped, the chord fires, the rank closes the item.

What it costs a slice that is not cancelled: the batch's status is read from SQL at most once per
``CANCEL_CHECK_S`` per process (``CancelFlag``, counted from the status the task's start read), and the
worker's progress written at most once per ``PROGRESS_EVERY_S`` (counted from the slice's start). A step
between those returns after two clock reads, so a fast model's slice (under 250 ms) reads and writes
nothing at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from time import monotonic
from typing import TYPE_CHECKING, Any

from farm import records

if TYPE_CHECKING:
    from farm.tasks.runtime import Runtime

log = logging.getLogger(__name__)

#: At most one read of a batch's cancel flag per this many seconds in a process: a cancel stops a slice
#: within about this long after it commits (plus the step in progress), for about four reads a second.
CANCEL_CHECK_S = 0.25
#: At most one progress write per this many seconds per slice (the dashboard polls every few seconds).
PROGRESS_EVERY_S = 1.0


class SliceCancelled(Exception):
    """Raised from a denoising step's callback: the slice's batch was cancelled. It ends the pipeline's call
    at once (diffusers' own ``pipe._interrupt`` would skip the remaining steps but still decode the
    half-denoised latents through the VAE, work nobody stores)."""

    def __init__(self, batch_id: str, step: int, steps: int) -> None:
        super().__init__(f"batch {batch_id} cancelled: stopped at denoising step {step} of {steps}")
        self.batch_id = batch_id
        self.step = step
        self.steps = steps


class CancelFlag:
    """Whether a batch is stopped (cancelling or cancelled), read through ``read`` at most once per ``every``
    seconds; between reads the last answer is given. One per process (``cancel_flag``): a worker process runs
    one slice at a time.

    A stopped batch never runs again (a cancelled batch cannot be retried or resumed), so a True answer is
    kept for good. A read that fails (the database is away) keeps the last answer and is tried again after
    ``every``: the slice goes on as it would have without this check, and its stage write meets the same
    database.
    """

    def __init__(
        self,
        read: Callable[[str], bool],
        *,
        every: float = CANCEL_CHECK_S,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self.read = read
        self.every = every
        self.clock = clock
        self.reads = 0
        self._batch: str | None = None
        self._stopped = False
        self._at = float("-inf")

    def seed(self, batch_id: str, stopped: bool) -> None:
        """Take a status just read elsewhere (the stage's start reads the batch row) as this flag's latest
        read, so the first read from SQL comes ``every`` seconds later, not at the slice's first step."""
        if self._batch == batch_id and self._stopped:
            return
        self._batch, self._stopped, self._at = batch_id, stopped, self.clock()

    def __call__(self, batch_id: str) -> bool:
        now = self.clock()
        if self._batch == batch_id and (self._stopped or now - self._at < self.every):
            return self._stopped
        stopped = self._stopped if self._batch == batch_id else False
        try:
            self.reads += 1
            stopped = self.read(batch_id)
        except Exception as exc:
            log.warning("could not read whether batch %s was cancelled: %s", batch_id, exc)
        self._batch, self._stopped, self._at = batch_id, stopped, now
        return stopped


class StepWatch:
    """The generator's step callback for one slice (``on_step(step, steps)`` in farm.ml.generator): raises
    ``SliceCancelled`` once the batch is stopped, and reports progress through ``report`` at most once per
    ``every`` seconds, the first only ``every`` seconds into the slice."""

    def __init__(
        self,
        flag: CancelFlag,
        batch_id: str,
        report: Callable[[int, int], Any] | None = None,
        *,
        every: float = PROGRESS_EVERY_S,
    ) -> None:
        self.flag = flag
        self.batch_id = batch_id
        self.report = report
        self.every = every
        self._reported = flag.clock()

    def __call__(self, step: int, steps: int) -> None:
        if self.flag(self.batch_id):
            raise SliceCancelled(self.batch_id, step, steps)
        if self.report is not None:
            now = self.flag.clock()
            if now - self._reported >= self.every:
                self._reported = now
                self.report(step, steps)


_flags: dict[str, CancelFlag] = {}


def cancel_flag(url: str) -> CancelFlag:
    """This process's cancel flag for the database at ``url``."""
    flag = _flags.get(url)
    if flag is None:
        flag = _flags[url] = CancelFlag(partial(records.batch_stopped, url))
    return flag


def watch_slice(rt: Runtime, batch_id: str, *, stopped: bool = False) -> StepWatch:
    """The step callback of a slice of ``batch_id`` generated by this process: ``stopped`` is the batch's
    status as the stage's start read it (a stopped batch's stage never generates, so normally False)."""
    flag = cancel_flag(rt.settings.database_url)
    flag.seed(batch_id, stopped)
    return StepWatch(flag, batch_id, rt.heartbeat.progress)
