"""Worker process for tests/test_race.py: races begin_distributed on one name per round.

Runs in a process started with multiprocessing's "spawn" method, so it shares nothing with
the parent but the barrier and the result queue. Each round every worker waits at the
barrier (the parent is the third party), so the workers start their attempt together, then
reports ``(worker, round, outcome)``.
"""

from __future__ import annotations

import threading
from typing import Any

import twophase

BARRIER_TIMEOUT = 60.0


def work(
    url: str, who: str, prefix: str, table: str, rounds: int, barrier: Any, results: Any
) -> None:
    db = twophase.connect(url, pool_min=1, pool_max=2)
    try:
        # Warm up (pool, outcome table) so round 0 is not skewed by first-call work.
        db.prepared()
        for rnd in range(rounds):
            try:
                barrier.wait(BARRIER_TIMEOUT)
            except threading.BrokenBarrierError:
                return  # the parent gave up (a failed assertion); just stop
            name = f"{prefix}{rnd}"

            def stage(tx: twophase.Transaction, rnd: int = rnd) -> None:
                tx.insert_into(table).values(round_no=rnd, who=who).execute()

            try:
                db.begin_distributed(name, stage)
                outcome = "won"
            except twophase.TransactionNameInUse:
                outcome = "in_use"
            except Exception as exc:
                # Anything else is a failure the parent reports in full.
                outcome = f"error: {type(exc).__name__}: {exc}"
            results.put((who, rnd, outcome))
    finally:
        db.close()
