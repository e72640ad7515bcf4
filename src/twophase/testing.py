"""Crash points: kill the coordinator at a chosen protocol step, in your own tests.

A crash point is a named step of the coordinator's protocol (see ``protocol.CRASH_POINTS``):

=====================  ===========================================================
``before_prepare``     every branch staged, none prepared
``after_prepare:N``    right after the N-th branch (1-based) is prepared
``before_decision``    every branch prepared, no decision written
``after_decision``     the commit decision is durable, no branch committed
``after_commit:N``     right after the N-th branch is committed
=====================  ===========================================================

Arm one in the process that runs the coordinator, either with the environment (so a child
process you start is armed from its first line)::

    TWOPHASE_CRASH_AT=after_prepare:2 python my_service.py

or in code::

    from twophase import testing
    testing.arm("after_decision")

When the coordinator reaches an armed point, the process sends itself SIGKILL: no cleanup,
no ``finally`` blocks, no flushed buffers, exactly like a power cut of that process. Then
run ``recover()`` from another process and check that your flow ends all-committed or
all-rolled-back. While a point is armed, branches are prepared and committed one at a
time in order, so ``after_prepare:2`` is hit at the same step on every run.
"""

from __future__ import annotations

import os
import signal
import sys

from .protocol import CRASH_POINTS

ENV = "TWOPHASE_CRASH_AT"

_armed: set[str] = set()


def _validate(point: str) -> str:
    base, _, index = point.partition(":")
    if base not in CRASH_POINTS or (index and not index.isdigit()):
        raise ValueError(
            f"unknown crash point {point!r}; use one of {', '.join(CRASH_POINTS)} "
            "(after_prepare and after_commit take :N, e.g. after_prepare:2)"
        )
    return point


def arm(*points: str) -> None:
    """Arm crash points in this process (``"after_prepare:2"``, ``"after_decision"``...)."""
    _armed.update(_validate(p) for p in points)


def disarm() -> None:
    """Disarm every crash point of this process."""
    _armed.clear()


def armed() -> bool:
    """Whether any crash point is armed (the coordinator then works step by step)."""
    return bool(_armed)


def reached(point: str) -> None:
    """Called by the coordinator at each step; dies here if ``point`` is armed."""
    if _armed and point in _armed:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


arm(*(p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip()))
