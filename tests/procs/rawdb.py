"""Direct driver access for tests: facts read from the server without going through twophase.

Checks such as "is it prepared" or "is the row there" use these, so a library bug cannot
hide behind the library's own answer.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import psycopg
import pymysql
from psycopg import sql as pgsql
from psycopg.rows import dict_row

T = TypeVar("T")

PG_GID_PREFIX = "tp:"
XA_FORMAT_ID = 0x7470  # "tp"


def is_pg(url: str) -> bool:
    return url.startswith("postgres")


@contextmanager
def connect(url: str, *, timeout: int = 5) -> Iterator[Any]:
    """An autocommit DB-API connection straight from the driver."""
    if is_pg(url):
        # A lock stuck behind a leftover prepared transaction then fails the test instead of
        # hanging it.
        pg = psycopg.connect(
            url,
            autocommit=True,
            row_factory=dict_row,
            connect_timeout=timeout,
            options="-c lock_timeout=30s",
        )
        try:
            yield pg
        finally:
            pg.close()
        return
    parts = urlsplit(url)
    my = pymysql.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
        database=parts.path.lstrip("/"),
        autocommit=True,
        connect_timeout=timeout,
        cursorclass=pymysql.cursors.DictCursor,
        init_command="SET SESSION lock_wait_timeout = 30",
    )
    try:
        yield my
    finally:
        my.close()


def query(url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    """Run one statement on a fresh connection and return its rows as dicts."""
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []


def prepared_names(url: str) -> set[str]:
    """Names of twophase transactions prepared now: pg_prepared_xacts / XA RECOVER."""
    if is_pg(url):
        rows = query(
            url,
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
        )
        return {r["gid"][len(PG_GID_PREFIX) :] for r in rows if r["gid"].startswith(PG_GID_PREFIX)}
    names = set()
    for r in query(url, "XA RECOVER"):
        if int(r["formatID"]) == XA_FORMAT_ID and int(r["bqual_length"]) == 0:
            data = r["data"]
            raw = data if isinstance(data, bytes) else str(data).encode()
            names.add(raw[: int(r["gtrid_length"])].decode("utf-8", "surrogateescape"))
    return names


def session_alive(url: str, sid: int) -> bool:
    """Whether the server still has the session (backend pid / connection id)."""
    if is_pg(url):
        return bool(query(url, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (sid,)))
    return bool(query(url, "SELECT 1 FROM information_schema.processlist WHERE id = %s", (sid,)))


def create_table(url: str, name: str, columns: str) -> None:
    query(url, f"CREATE TABLE {name} ({columns})")


def drop_table(url: str, name: str) -> None:
    query(url, f"DROP TABLE IF EXISTS {name}")


def poll(check: Callable[[], T], *, timeout: float = 20.0, what: str = "condition") -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    last: Any = None
    while True:
        try:
            last = check()
        except Exception as exc:  # e.g. the server is still starting
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def accepts_connections(url: str) -> bool:
    try:
        query(url, "SELECT 1 AS one")
    except Exception:
        return False
    return True


# -- server restarts ------------------------------------------------------------------------

PG_CLUSTER = ("15", "main")
MARIADB_BIN = "/usr/sbin/mariadbd"
MARIADB_PID_FILE = Path("/run/mysqld/mysqld.pid")


def restart_postgres(url: str) -> None:
    """Restart the PostgreSQL cluster and wait until it accepts connections."""
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    poll(lambda: accepts_connections(url), timeout=60, what="PostgreSQL to accept connections")


def ensure_postgres(url: str) -> None:
    """Start PostgreSQL if it is down (used in finally blocks: the server must stay up)."""
    if accepts_connections(url):
        return
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, "start"],
        check=False,
        capture_output=True,
        timeout=120,
    )
    poll(lambda: accepts_connections(url), timeout=60, what="PostgreSQL to accept connections")


def _mariadb_pid() -> int | None:
    try:
        return int(MARIADB_PID_FILE.read_text().strip())
    except (OSError, ValueError):
        return None


def _start_mariadb(url: str) -> None:
    # The same command the machine's set-up used; --oknodo makes it a no-op if it runs.
    subprocess.run(
        ["start-stop-daemon", "--start", "--oknodo", "--background", "--exec", MARIADB_BIN],
        check=True,
        capture_output=True,
        timeout=60,
    )
    poll(lambda: accepts_connections(url), timeout=90, what="MariaDB to accept connections")


def restart_mariadb(url: str) -> None:
    """Shut MariaDB down cleanly, wait for the process to exit, start it again."""
    pid = _mariadb_pid()
    subprocess.run(["mariadb-admin", "-uroot", "shutdown"], check=True, timeout=120)
    if pid is not None:
        # start-stop-daemon --oknodo would see a dying server as "already running".
        poll(lambda: not Path(f"/proc/{pid}").exists(), timeout=90, what="mariadbd to exit")
    _start_mariadb(url)


def ensure_mariadb(url: str) -> None:
    """Start MariaDB if it is down (used in finally blocks: the server must stay up)."""
    if accepts_connections(url):
        return
    pid = _mariadb_pid()
    if pid is not None and Path(f"/proc/{pid}").exists():
        # Still shutting down: let it finish before starting a new one.
        poll(lambda: not Path(f"/proc/{pid}").exists(), timeout=90, what="mariadbd to exit")
    _start_mariadb(url)


def rollback_if_prepared(url: str, full_name: str) -> None:
    """Roll back a leftover prepared transaction with the driver (clean-up after a failed
    test: a prepared transaction keeps its locks, and DROP TABLE would wait on them forever)."""
    if full_name not in prepared_names(url):
        return
    if is_pg(url):
        # A utility statement takes no bind parameters: quote the gid as a literal instead.
        stmt = pgsql.SQL("ROLLBACK PREPARED {}").format(pgsql.Literal(PG_GID_PREFIX + full_name))
        query(url, stmt)
    else:
        query(url, f"XA ROLLBACK %s, '', {XA_FORMAT_ID}", (full_name,))
