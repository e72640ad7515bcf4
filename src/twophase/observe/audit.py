"""The audit trail: every event, written to the ``twophase_audit_log`` table.

:class:`AuditLog` is an observer. By default it queues events and a background thread
writes them in batches (a COPY on PostgreSQL, a multi-row INSERT on MariaDB; at most one
batch per ``flush_interval`` seconds unless ``max_batch`` events are waiting), so the
transaction it describes pays no round trip for it. The outcome itself never depends on
the audit: the outcome and decision rows are the durable truth, and a failed audit write
is retried, then logged, never raised into the transaction.

What a hard crash can lose: events queued in the last ``flush_interval`` (0.2 s by
default). ``synchronous=True`` writes each event before the step returns, at the cost of a
round trip and a commit per step. ``flush()`` waits for everything queued so far;
``close()`` (also run at interpreter exit and by the database's ``close()``) flushes.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..dialects import Dialect, ErrorKind
from ._backlog import Backlog
from .events import Event

if TYPE_CHECKING:
    from .._sync.database import Database

log = logging.getLogger("twophase.audit")

TABLE = "twophase_audit_log"
COLUMNS = (
    "at",
    "step",
    "name",
    "branch",
    "participant",
    "outcome",
    "duration_ms",
    "correlation_id",
    "principal",
    "detail",
)
_DETAIL = 2000  # characters kept of an error or reason
# What the database says when it will never take the event as it is.
_REFUSALS = (ErrorKind.DUPLICATE_KEY, ErrorKind.INTEGRITY, ErrorKind.BAD_VALUE)


class AuditSQL:
    """The audit table's SQL for one dialect; no I/O."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.table = dialect.sql.quote_ident(TABLE)

    def schema(self) -> tuple[str, ...]:
        """CREATE TABLE / INDEX IF NOT EXISTS."""
        t = self.table
        if self.dialect.name == "postgresql":
            return (
                f"CREATE TABLE IF NOT EXISTS {t} ("
                " id bigserial PRIMARY KEY, at timestamptz NOT NULL,"
                " step varchar(16) NOT NULL, name varchar(64) NOT NULL, branch varchar(64),"
                " participant varchar(128), outcome varchar(16) NOT NULL,"
                " duration_ms double precision NOT NULL, correlation_id varchar(64) NOT NULL,"
                " principal varchar(128), detail text)",
                f"CREATE INDEX IF NOT EXISTS twophase_audit_log_name ON {t} (name, id)",
                f"CREATE INDEX IF NOT EXISTS twophase_audit_log_cid ON {t} (correlation_id)",
            )
        ascii_ = "CHARACTER SET ascii COLLATE ascii_bin"
        return (
            f"CREATE TABLE IF NOT EXISTS {t} ("
            " id BIGINT AUTO_INCREMENT PRIMARY KEY, at DATETIME(6) NOT NULL,"
            f" step VARCHAR(16) NOT NULL, name VARCHAR(64) {ascii_} NOT NULL,"
            f" branch VARCHAR(64) {ascii_}, participant VARCHAR(128),"
            " outcome VARCHAR(16) NOT NULL, duration_ms DOUBLE NOT NULL,"
            " correlation_id VARCHAR(64) NOT NULL, principal VARCHAR(128), detail TEXT,"
            " KEY twophase_audit_log_name (name, id),"
            " KEY twophase_audit_log_cid (correlation_id)"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        )

    def insert(self, events: list[Event]) -> tuple[str, tuple[Any, ...]]:
        """One multi-row INSERT for ``events``."""
        row = "(" + ", ".join(["%s"] * len(COLUMNS)) + ")"
        sql = f"INSERT INTO {self.table} ({', '.join(COLUMNS)}) VALUES " + ", ".join(
            [row] * len(events)
        )
        params: list[Any] = []
        for values in self.rows(events):
            params += values
        return sql, tuple(params)

    def copy(self) -> str | None:
        """``COPY ... FROM STDIN`` taking :meth:`copy_data` (PostgreSQL), or None (MariaDB).

        On PostgreSQL a batch is loaded with COPY rather than the multi-row INSERT: the
        INSERT's text and its parameters grow with the batch, so the client adapts and the
        server parses and plans thousands of parameters each time, several times what
        storing the rows costs.
        """
        if self.dialect.name != "postgresql":
            return None
        return f"COPY {self.table} ({', '.join(COLUMNS)}) FROM STDIN"

    def copy_data(self, events: list[Event], chunk: int = 64) -> Iterator[bytes]:
        """The rows of ``events`` in COPY's text format, ``chunk`` rows at a time.

        Formatted here rather than adapted value by value by the driver (``write_row``):
        the values are few and of known kinds (a timestamp, a number, text to escape), and
        the writer's client time per event drops by about a third.
        """
        stamp = _Stamp()
        for i in range(0, len(events), chunk):
            lines = []
            for e in events[i : i + chunk]:
                lines.append(
                    f"{stamp(e.started)}\t{e.step.value}\t{_copy_text(e.name)}\t{_copy_text(e.branch)}\t"
                    f"{_copy_text(_cut(e.participant, 128))}\t{e.outcome.value}\t"
                    f"{e.duration * 1000:.3f}\t{_copy_text(e.correlation_id)}\t"
                    f"{_copy_text(_cut(e.principal, 128))}\t"
                    f"{_copy_text(_cut(e.detail, _DETAIL))}\n"
                )
            yield "".join(lines).encode()

    def rows(self, events: list[Event]) -> list[tuple[Any, ...]]:
        """The column values (``COLUMNS``) of each event."""
        pg = self.dialect.name == "postgresql"
        out = []
        for e in events:
            at = datetime.fromtimestamp(e.started, UTC)
            out.append(
                (
                    at if pg else at.replace(tzinfo=None),  # DATETIME(6) holds UTC
                    e.step.value,
                    e.name,
                    e.branch,
                    _clean(_cut(e.participant, 128)),
                    e.outcome.value,
                    round(e.duration * 1000, 3),
                    _clean(e.correlation_id),
                    _clean(_cut(e.principal, 128)),
                    _clean(_cut(e.detail, _DETAIL)),
                )
            )
        return out

    def cutoff(self, before: datetime) -> datetime:
        """``before`` as the ``at`` column stores it (naive UTC on MariaDB)."""
        before = before.astimezone(UTC)
        return before if self.dialect.name == "postgresql" else before.replace(tzinfo=None)

    def count_before(self, before: datetime) -> tuple[str, tuple[Any, ...]]:
        """How many events are older than ``before``."""
        return f"SELECT count(*) AS n FROM {self.table} WHERE at < %s", (self.cutoff(before),)

    def prune(self, before: datetime, batch: int) -> tuple[str, tuple[Any, ...]]:
        """Delete up to ``batch`` of the oldest events older than ``before``.

        In id order, which follows time closely: each batch reads the start of the primary
        key, where the old rows are, rather than the whole table (there is no index on
        ``at``, so every write of the audit stays cheap).
        """
        t, cut = self.table, self.cutoff(before)
        if self.dialect.name == "postgresql":
            return (
                f"DELETE FROM {t} WHERE id IN (SELECT id FROM {t} WHERE at < %s "
                f"ORDER BY id LIMIT {int(batch)})",
                (cut,),
            )
        return f"DELETE FROM {t} WHERE at < %s ORDER BY id LIMIT {int(batch)}", (cut,)

    def select(
        self, *, name: str | None = None, correlation_id: str | None = None, limit: int = 1000
    ) -> tuple[str, tuple[Any, ...]]:
        """Events of one transaction name and/or correlation id, oldest first."""
        where, params = [], []
        if name is not None:
            where.append("name = %s")
            params.append(name)
        if correlation_id is not None:
            where.append("correlation_id = %s")
            params.append(correlation_id)
        if not where:
            raise ValueError("give a transaction name or a correlation id")
        return (
            f"SELECT id, {', '.join(COLUMNS)} FROM {self.table} WHERE {' AND '.join(where)} "
            f"ORDER BY at, id LIMIT {int(limit)}",
            tuple(params),
        )


def normalize_rows(rows: Any) -> list[dict[str, Any]]:
    """Audit rows as dicts with timezone-aware ``at`` on every dialect."""
    out = []
    for row in rows:
        item = dict(row)
        at = item.get("at")
        if isinstance(at, datetime) and at.tzinfo is None:
            item["at"] = at.replace(tzinfo=UTC)
        if item.get("duration_ms") is not None:
            item["duration_ms"] = float(item["duration_ms"])
        out.append(item)
    return out


class AuditLog:
    """An observer writing every event to ``twophase_audit_log`` in the database at ``url``.

    ``url`` is a twophase URL (PostgreSQL or MariaDB/MySQL); ``connect(..., audit=True)``
    makes one for the database itself. The log opens its own connection, so it works the
    same under the sync and the async API.
    """

    def __init__(
        self,
        url: str,
        *,
        flush_interval: float = 0.2,
        max_batch: int = 500,
        max_queue: int = 100_000,
        synchronous: bool = False,
    ) -> None:
        if flush_interval <= 0 or max_batch < 1 or max_queue < max_batch:
            raise ValueError("need flush_interval > 0, max_batch >= 1 and max_queue >= max_batch")
        self.url = url
        self.flush_interval = flush_interval
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.synchronous = synchronous
        self._sql: AuditSQL | None = None
        self._db: Database | None = None
        self._write_lock = threading.Lock()
        self._backlog: Backlog[Event] = Backlog(
            "twophase-audit",
            self._run,
            gather=flush_interval,
            max_batch=max_batch,
            max_queue=max_queue,
        )
        _OPEN.add(self)

    @property
    def dropped(self) -> int:
        """Events dropped: the queue overflowed while the database was unreachable, or the
        database refused the event itself (a value it cannot store; logged as an error)."""
        return self._backlog.dropped

    def __repr__(self) -> str:
        return f"<AuditLog {self.url.split('@')[-1]} queued={len(self._backlog)}>"

    def __call__(self, event: Event) -> None:
        if self._backlog.closed:
            return
        if self.synchronous:
            try:
                self._write([event])
            except Exception:
                log.warning("could not write an audit event of %s", event.name, exc_info=True)
            return
        self._backlog.put(event)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event queued so far is written; False on timeout."""
        return self._backlog.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Flush, then stop the writer and close its connection."""
        if self._backlog.closed:
            return
        if not self.flush(timeout):
            log.warning("closing the audit log with %d events unwritten", len(self._backlog))
        self._backlog.close(timeout)
        with self._write_lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        _OPEN.discard(self)

    def history(
        self, name: str | None = None, *, correlation_id: str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Written events of a full transaction name and/or correlation id, oldest first."""
        self.flush()
        with self._write_lock:
            db, sql = self._connection()
            rows = db._autocommit(
                *sql.select(name=name, correlation_id=correlation_id, limit=limit)
            )
            return normalize_rows(rows)

    # -- the writer ------------------------------------------------------------------

    def _run(self) -> None:
        backlog = self._backlog
        delay = self.flush_interval
        while (batch := backlog.take()) is not None:
            try:
                self._write(batch)
                backlog.done(len(batch))
                batch = []
            except Exception as exc:
                error: Exception | None = exc
                if self._refused(exc):
                    # One event the database refuses must not hold back the others:
                    # write them one by one and drop only what is refused.
                    batch, error = self._write_each(batch)
            if batch:
                # Loud once per outage, quiet while it lasts.
                if delay == self.flush_interval:
                    log.warning("could not write %d audit events (%s); retrying", len(batch), error)
                else:
                    log.debug("audit write failed again: %s", error)
                if not backlog.put_back(batch):
                    return  # close() gave up waiting: they are counted as lost, loudly
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if delay != self.flush_interval:
                log.warning("audit log writable again")
            delay = self.flush_interval

    def _write_each(self, events: list[Event]) -> tuple[list[Event], Exception | None]:
        """Write ``events`` one at a time, dropping (counted, logged) each one the database
        refuses; the events left unwritten when another error stops it, and that error."""
        for i, event in enumerate(events):
            try:
                self._write([event])
            except Exception as exc:
                if not self._refused(exc):
                    return events[i:], exc
                self._backlog.drop(1)
                log.error(
                    "the database refused the audit event %s %s %s, dropped: %s",
                    event.step.value,
                    event.name,
                    event.outcome.value,
                    exc,
                )
                continue
            self._backlog.done(1)
        return [], None

    def _refused(self, exc: BaseException) -> bool:
        """Whether the database refused the data itself (a value it cannot store, a
        constraint), as opposed to being unreachable: retrying the same rows cannot help."""
        db = self._db
        seen: BaseException | None = exc
        while db is not None and seen is not None:
            if db.dialect.classify(seen) in _REFUSALS:
                return True
            seen = seen.__cause__
        return False

    def _write(self, events: list[Event]) -> None:
        with self._write_lock:
            db, sql = self._connection()
            copy = sql.copy()
            if copy is None:
                db._autocommit(*sql.insert(events))
                return
            with db._pool.connection() as conn:
                conn.copy_in(copy, _yielding(sql.copy_data(events)))

    def _connection(self) -> tuple[Database, AuditSQL]:
        if self._db is None or self._sql is None:
            from .._sync.connect import connect

            db = connect(self.url, pool_min=0, pool_max=1, retry_timeout=2.0)
            sql = AuditSQL(db.dialect)
            db._ensure_tables("audit", sql.schema())
            self._db, self._sql = db, sql
        return self._db, self._sql


def _cut(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else text[: limit - 3] + "..."


# PostgreSQL's text cannot hold NUL: one in a principal, a correlation id or an error
# message would fail its whole batch on every retry, and the events queued behind it with
# it. Stored as U+FFFD, the replacement character, on every dialect alike.
_NUL = "\0"
_REPLACEMENT = "\ufffd"
# COPY's text format: backslash, tab, newline and carriage return are escaped, NULL is \N.
_COPY_ESCAPES = str.maketrans(
    {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", _NUL: _REPLACEMENT}
)


def _clean(text: str | None) -> str | None:
    return text if text is None or _NUL not in text else text.replace(_NUL, _REPLACEMENT)


def _copy_text(text: str | None) -> str:
    if text is None:
        return "\\N"
    # Two scans in C: most values have nothing to escape, and translate() costs more.
    if text.isprintable() and "\\" not in text:
        return text
    return text.translate(_COPY_ESCAPES)


class _Stamp:
    """Epoch seconds as a COPY ``timestamptz`` in UTC, to the microsecond; the date and
    time of day are formatted once per second, since a batch's events share most of them."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, started: float) -> str:
        second, micro = divmod(round(started * 1_000_000), 1_000_000)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(second))
        return f"{self._text}.{micro:06d}+00"


def _yielding(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """``chunks``, letting other threads run between two: a batch is formatted while this
    thread holds the GIL, and a caller whose statement completed meanwhile would wait for
    the interpreter's switch interval (5 ms) otherwise."""
    for chunk in chunks:
        yield chunk
        time.sleep(0)


_OPEN: weakref.WeakSet[AuditLog] = weakref.WeakSet()


# The connections of audit logs a child inherited: kept referenced so that they are never
# finalized in the child, which would end the parent's session on the shared socket.
_INHERITED: list[object] = []


def _after_fork_in_child() -> None:
    # The backlog starts afresh by itself; the connection and its lock are the parent's.
    for audit in list(_OPEN):
        if audit._db is not None:
            _INHERITED.append(audit._db)
        audit._db = None  # the child opens its own on its first write
        audit._write_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_all() -> None:
    for audit in list(_OPEN):
        try:
            audit.close(timeout=5.0)
        except Exception:
            log.warning("could not flush %r at exit", audit, exc_info=True)
