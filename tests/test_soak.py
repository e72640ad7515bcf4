"""Randomized crash soak, CI size: a coordinator process is SIGKILLed hundreds of times.

A worker process (tests/procs/soak_worker.py) runs global transactions over ``orders``
(PostgreSQL ``test``), ``stock`` (PostgreSQL ``test2``) and ``billing`` (MariaDB ``test``)
in a loop; each inserts one row keyed by its id into every participant, and some also add 1
to a counter slot in every database. The parent SIGKILLs the worker 0-300 ms after it
starts working (seeded RNG), starts the next one, and runs recovery now and then: in
process, or in a recovery process that runs alongside a worker and is itself SIGKILLed
mid-way half of the time. At the end it recovers until nothing waits, then checks every
transaction id ever started (the id log, plus every row found): rows in all three databases
or in none, a commit decision exactly for those in all three, counters equal to their rows,
nothing left prepared.

``TWOPHASE_SOAK_KILLS`` sets the number of kills (default 200), ``TWOPHASE_SOAK_SEED`` the
seed (random by default, printed either way: rerun a failure with it). The long version is
``scripts/soak`` (docs/soak.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from procs import soak_worker

KILLS = int(os.environ.get("TWOPHASE_SOAK_KILLS", "200"))
SEED = os.environ.get("TWOPHASE_SOAK_SEED")


def test_randomized_kills_leave_every_transaction_atomic(tmp_path: Path) -> None:
    lines: list[str] = []

    def out(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    result = soak_worker.run_soak(
        kills=KILLS,
        seed=int(SEED) if SEED else None,
        workdir=str(tmp_path),
        out=out,
    )
    report = "\n".join(lines)
    assert result.kills == KILLS, report
    assert result.violations == 0, report
    assert result.problems == [], report
    assert result.unlogged == 0, report  # ids are logged before their transaction begins
    if KILLS >= 100:
        # The run exercised what it claims to: both outcomes, and recovery in both directions.
        assert result.committed > 0 and result.rolled_back > 0, report
        assert result.recovered_commits > 0 and result.fenced > 0, report
        assert result.recovery_kills > 0, report
