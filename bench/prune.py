"""How fast ``prune_outcomes`` forgets old outcome records, on PostgreSQL and MariaDB.

Each database gets a scratch schema (PostgreSQL) or database (MariaDB), filled with
``--records`` outcome records 40 days old, plus a prepared transaction that must be left
alone; then ``db.prune_outcomes(timedelta(days=30))`` runs and the records per second are
printed. The scratch schema or database is dropped at the end.

    .venv/bin/python bench/prune.py                       # 200,000 records, both databases
    .venv/bin/python bench/prune.py --records 1000000 --only postgresql
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

import twophase

URLS = {
    "postgresql": "postgresql://postgres@127.0.0.1:5432/test",
    "mysql": "mysql://root@127.0.0.1:3306/test",
}


@contextmanager
def scratch(dialect: str, base: str) -> Iterator[str]:
    """The URL of an empty schema (PostgreSQL) or database (MariaDB), dropped after."""
    name = f"tp_prune_{secrets.token_hex(4)}"
    with twophase.connect(base) as admin:
        if dialect == "postgresql":
            admin.execute(f"CREATE SCHEMA {name}")
            url = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{name}"
            drop = f"DROP SCHEMA IF EXISTS {name} CASCADE"
        else:
            admin.execute(f"CREATE DATABASE {name}")
            url = base.rsplit("/", 1)[0] + f"/{name}"
            drop = f"DROP DATABASE IF EXISTS {name}"
        try:
            yield url
        finally:
            admin.execute(drop)


def fill(db: twophase.Database, dialect: str, records: int) -> None:
    """``records`` committed outcome records, recorded 40 days ago."""
    db.status("bench-probe")  # creates the outcome table
    step = 50_000
    for start in range(1, records + 1, step):
        end = min(start + step - 1, records)
        if dialect == "postgresql":
            db.execute(
                "INSERT INTO twophase_outcome (name, outcome, recorded_at) "
                "SELECT 'old-' || lpad(g::text, 10, '0'), 'committed', "
                f"now() - interval '40 days' FROM generate_series({start}, {end}) g"
            )
        else:  # MariaDB's sequence engine
            db.execute(
                "INSERT INTO twophase_outcome (name, outcome, recorded_at) "
                "SELECT CONCAT('old-', LPAD(seq, 10, '0')), 'committed', "
                f"NOW(6) - INTERVAL 40 DAY FROM seq_{start}_to_{end}"
            )


def run(dialect: str, base: str, records: int, batch: int) -> float:
    """Seconds the prune took; checks it deleted exactly the old records."""
    with scratch(dialect, base) as url, twophase.connect(url) as db:
        fill(db, dialect, records)
        db.begin_distributed("still-prepared", lambda tx: tx.execute("SELECT 1"))
        try:
            started = time.perf_counter()
            deleted = db.prune_outcomes(timedelta(days=30), batch=batch)
            seconds = time.perf_counter() - started
            if deleted != records:
                raise SystemExit(f"{dialect}: deleted {deleted}, expected {records}")
            if db.status("still-prepared") is not twophase.Status.PREPARED:
                raise SystemExit(f"{dialect}: the prepared transaction was touched")
        finally:
            db.rollback_distributed("still-prepared")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=200_000, help="old records to prune")
    p.add_argument("--batch", type=int, default=5_000, help="prune_outcomes(batch=...)")
    p.add_argument("--only", choices=sorted(URLS), help="one database only")
    p.add_argument("--postgresql-url", default=URLS["postgresql"])
    p.add_argument("--mysql-url", default=URLS["mysql"])
    args = p.parse_args(argv)
    if args.records < 1 or args.batch < 1:
        p.error("--records and --batch take positive numbers")
    urls = {"postgresql": args.postgresql_url, "mysql": args.mysql_url}
    for dialect in [args.only] if args.only else sorted(URLS, reverse=True):
        seconds = run(dialect, urls[dialect], args.records, args.batch)
        print(
            f"{dialect:10s} {args.records:>9,} records pruned in {seconds:6.1f} s: "
            f"{args.records / seconds:>8,.0f} records/s (batch {args.batch})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
