"""Processes that do not outlive the process that started them.

Why: `farm up` supervises a tree of processes (embedded Redis, a worker per device and their pool children,
QC workers, the control worker and its embedded beat, the web app, Flower). If any parent in that tree is
killed outright (SIGKILL, the OOM killer, a supervisor's stop timeout), the kernel re-parents its children to
init and they go on: workers retrying a broker that is gone, a second beat scheduling the reaper. Linux's
PR_SET_PDEATHSIG has the kernel send a signal to a process when its parent dies, which is exactly the tie
we want. It is kept across execve, so ``python -m farm.lifeline PARENT SIGNAL -- ARGV...`` sets it and then
becomes ARGV: any program, Python or not, dies with the process that started it.

Caveat (the kernel's, documented in prctl(2)): the "parent" is the thread that forked the child. Spawn tied
processes from a thread that lives as long as the parent does (the main thread in `farm up`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int, parent: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies; False where that is not possible.

    ``parent`` is the pid the caller expects as its parent: if that one is already gone (it died between the
    fork and this call, so the kernel will never signal), the signal is sent now.
    """
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig)) != 0:
            return False
    except (OSError, AttributeError):  # not Linux
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def tied(argv: list[str], sig: int = signal.SIGKILL, parent: int | None = None) -> list[str]:
    """``argv`` wrapped so that the program it runs gets ``sig`` when its parent (this process) dies."""
    parent = os.getpid() if parent is None else parent
    return [sys.executable, "-m", "farm.lifeline", str(parent), signal.Signals(sig).name, "--", *argv]


def main(args: list[str]) -> None:
    if len(args) < 4 or args[2] != "--":
        raise SystemExit("usage: python -m farm.lifeline PARENT_PID SIGNAL -- PROGRAM [ARGS...]")
    parent, sig = int(args[0]), signal.Signals[args[1]]
    die_with_parent(sig, parent)
    os.execvp(args[3], args[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
