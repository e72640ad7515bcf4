"""Two processes race begin_distributed on one name, round after round: exactly one wins.

Two long-lived worker processes (tests/procs/race_worker.py, started with "spawn") meet the
parent at a barrier each round and then both call ``begin_distributed`` on that round's
name. Each attempt inserts ``(round, worker)`` into a table keyed by round. The parent
checks the round's two outcomes and commits the winner before the next round.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import queue
import uuid
from collections import Counter

import pytest
from procs import race_worker, rawdb

import twophase
from twophase import Status

ROUNDS = 50
WORKERS = ("A", "B")
RESULT_TIMEOUT = 60.0


def test_two_processes_race_for_one_name(url: str, dialect_name: str) -> None:
    # Not "t_": conftest's table fixture rolls back prepared t_* names of other processes.
    prefix = f"race_{uuid.uuid4().hex[:12]}_"
    table = f"tp_race_{uuid.uuid4().hex[:10]}"
    rawdb.create_table(url, table, "round_no int PRIMARY KEY, who varchar(8) NOT NULL")

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(WORKERS) + 1)
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=race_worker.work,
            args=(url, who, prefix, table, ROUNDS, barrier, results),
            name=f"race-{who}",
        )
        for who in WORKERS
    ]
    winners: dict[int, str] = {}
    outcomes: dict[int, dict[str, str]] = {}
    db = twophase.connect(url, pool_max=2)
    try:
        for w in workers:
            w.start()
        for rnd in range(ROUNDS):
            barrier.wait(RESULT_TIMEOUT)
            got: dict[str, str] = {}
            for _ in WORKERS:
                try:
                    who, r, outcome = results.get(timeout=RESULT_TIMEOUT)
                except queue.Empty:
                    pytest.fail(f"round {rnd}: a worker sent no result; got {got}")
                assert r == rnd
                got[who] = outcome
            outcomes[rnd] = got
            won = [who for who, o in got.items() if o == "won"]
            in_use = [who for who, o in got.items() if o == "in_use"]
            # Exactly one winner, and the loser was told TransactionNameInUse (not some
            # other error, and not a silent success).
            assert len(won) == 1 and len(in_use) == 1, f"round {rnd}: {got}"
            winners[rnd] = won[0]
            db.commit_distributed(f"{prefix}{rnd}")
        for w in workers:
            w.join(timeout=RESULT_TIMEOUT)
            assert w.exitcode == 0, f"{w.name} exited with {w.exitcode}"

        wins = Counter(winners.values())
        print(f"\n[{dialect_name}] race wins over {ROUNDS} rounds: {dict(sorted(wins.items()))}")

        rows = rawdb.query(url, f"SELECT round_no, who FROM {table} ORDER BY round_no")
        assert [(r["round_no"], r["who"]) for r in rows] == sorted(winners.items())
        assert not {n for n in rawdb.prepared_names(url) if n.startswith(prefix)}
        assert not [p for p in db.prepared() if p.name.startswith(prefix)]
        assert all(db.status(f"{prefix}{rnd}") is Status.COMMITTED for rnd in range(ROUNDS))
    finally:
        # On failure, release workers blocked at the barrier, then make sure they are gone.
        barrier.abort()
        for w in workers:
            if w.pid is not None:
                w.join(timeout=10)
                if w.is_alive():
                    w.kill()
                    w.join(timeout=10)
        for name in rawdb.prepared_names(url):
            if name.startswith(prefix):
                # A failed round may leave a prepared winner holding the table's locks.
                with contextlib.suppress(twophase.TwoPhaseError):
                    db.rollback_distributed(name)
        db.close()
        rawdb.drop_table(url, table)
