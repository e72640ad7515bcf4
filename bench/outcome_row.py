"""What does the outcome record cost the server, with no Python in the loop?

Runs pgbench (C, one connection per client) against one PostgreSQL with three scripts that
differ only in how the transaction begins, all in pgbench's simple query mode:

  (b)  hand-written 2PC:  BEGIN; INSERT row; PREPARE TRANSACTION; COMMIT PREPARED
  (b+) (b) opened with twophase's claim, byte for byte what the library sends (its
       BEGIN, SET LOCAL lock_timeout, INSERT into the outcome table, SET LOCAL back)
  (p)  (b) plus a second one-row INSERT into a table without an index, for scale: what any
       second row costs

in rounds, taking turns, and prints transactions/s, the whole machine's CPU per
transaction (pgbench's own share included; it is small) and (b+)/(b): the ceiling that the
outcome record puts on twophase's (c)/(b) in bench/tpc_overhead.py, before any Python.

    .venv/bin/python bench/outcome_row.py [--clients 16] [--rounds 5] [--seconds 4] [--url URL]

It creates and finally drops the schema ``bench_outcome_row``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

from twophase.dialects import PostgresDialect
from twophase.names import TxName

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
SCHEMA = "bench_outcome_row"
# A name of the shape tpc_overhead.py uses; pgbench fills in the client and a random number.
NAME = "tpbench-000000.00.:client_id.:id"
GID = "bor-:client_id-:id"

ROW = f"INSERT INTO {SCHEMA}.rows (id, payload) VALUES (:id, 'benchmark payload, 32 bytes long');"
FINISH = f"PREPARE TRANSACTION '{GID}';\nCOMMIT PREPARED '{GID}';\n"
HEAD = "\\set id random(1, 1000000000000)\n"


def claim_sql() -> str:
    """The library's claim for NAME, pointed at this run's schema."""
    (sql,) = PostgresDialect().claim(TxName.make("tpbench-000000.00.0.0"))
    sql = sql.replace('"twophase_outcome"', f"{SCHEMA}.twophase_outcome")
    sql = sql.replace("'tpbench-000000.00.0.0'", f"'{NAME}'")
    if NAME not in sql or SCHEMA not in sql:
        sys.exit(f"the library's claim no longer has the expected shape: {sql}")
    return sql.replace("; ", " \\; ") + ";"


def scripts() -> dict[str, str]:
    """pgbench scripts by variant."""
    return {
        "b": HEAD + "BEGIN;\n" + ROW + "\n" + FINISH,
        "b+": HEAD + claim_sql() + "\n" + ROW + "\n" + FINISH,
        "p": HEAD
        + f"BEGIN \\; INSERT INTO {SCHEMA}.heap (name) VALUES ('{NAME}');\n"
        + ROW
        + "\n"
        + FINISH,
    }


def schema(conn: psycopg.Connection[object]) -> None:
    (outcome_ddl,) = PostgresDialect().schema()
    outcome_ddl = outcome_ddl.replace('"twophase_outcome"', f"{SCHEMA}.twophase_outcome")
    conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    conn.execute(f"CREATE SCHEMA {SCHEMA}")
    conn.execute(f"CREATE TABLE {SCHEMA}.rows (id bigint PRIMARY KEY, payload text NOT NULL)")
    conn.execute(f"CREATE TABLE {SCHEMA}.heap (name varchar(128) NOT NULL)")
    conn.execute(outcome_ddl.replace("IF NOT EXISTS ", ""))


def busy_jiffies() -> int:
    """Busy time of the whole machine so far, in clock ticks (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[:8]) - fields[3] - fields[4]  # minus idle and iowait


def run(pgbench: str, script: Path, url: str, clients: int, seconds: int) -> tuple[float, float]:
    """(transactions/s, machine CPU microseconds per transaction) of one pgbench run."""
    tick = os.sysconf("SC_CLK_TCK")
    before = busy_jiffies()
    jobs = str(min(clients, 2))
    command = [pgbench, "-n", "-M", "simple", "-c", str(clients), "-j", jobs, "-T", str(seconds)]
    command += ["--random-seed", "rand"]
    out = subprocess.run(
        [*command, "-f", str(script), url],
        capture_output=True,
        text=True,
        check=False,
    )
    after = busy_jiffies()
    done = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    tps = re.search(r"tps = ([\d.]+)", out.stdout)
    if out.returncode != 0 or done is None or tps is None or int(done.group(1)) == 0:
        sys.exit(f"pgbench failed on {script.name}:\n{out.stdout}\n{out.stderr}")
    return float(tps.group(1)), (after - before) / tick * 1e6 / int(done.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=os.environ.get("TWOPHASE_BENCH_URL", DEFAULT_URL))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=4)
    args = p.parse_args()
    pgbench = shutil.which("pgbench")
    if pgbench is None:
        sys.exit("pgbench not found: install PostgreSQL's client programs (postgresql-client)")
    with psycopg.connect(args.url, autocommit=True) as conn:
        if int(conn.execute("SHOW max_prepared_transactions").fetchone()[0]) < args.clients:
            sys.exit("max_prepared_transactions is below --clients: run scripts/setup-postgres.sh")
        schema(conn)
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for key, text in scripts().items():
                paths[key] = Path(tmp) / f"{key.replace('+', 'plus')}.sql"
                paths[key].write_text(text)
            for r in range(args.rounds):
                for key, path in paths.items():
                    # Every run starts from empty tables: the same index depth for each, and
                    # no random id drawn twice across runs.
                    with psycopg.connect(args.url, autocommit=True) as conn:
                        conn.execute(
                            f"TRUNCATE {SCHEMA}.rows, {SCHEMA}.heap, {SCHEMA}.twophase_outcome"
                        )
                        conn.execute("CHECKPOINT")
                    results.setdefault(key, []).append(
                        run(pgbench, path, args.url, args.clients, args.seconds)
                    )
                    tps, cpu = results[key][-1]
                    print(f"  round {r + 1}/{args.rounds} ({key:2}) {tps:8.0f} tx/s {cpu:5.0f} us")
    finally:
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    med = {k: statistics.median(t for t, _ in v) for k, v in results.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in results.items()}
    print(f"\npgbench, {args.clients} clients, {args.rounds} rounds x {args.seconds} s, medians:")
    labels = {
        "b": "hand-written 2PC",
        "b+": "(b) opened with twophase's claim",
        "p": "(b) + one row in an index-less table",
    }
    for k in results:
        print(f"  ({k:2}) {labels[k]:38} {med[k]:8.0f} tx/s  {cpu[k]:5.0f} us CPU/tx")
    paired = [bp[0] / b[0] for b, bp in zip(results["b"], results["b+"], strict=True)]
    print(
        f"  (b+)/(b) = {med['b+'] / med['b']:.3f} [paired {', '.join(f'{x:.3f}' for x in paired)}]"
        f"  (p)/(b) = {med['p'] / med['b']:.3f}"
    )


if __name__ == "__main__":
    main()
