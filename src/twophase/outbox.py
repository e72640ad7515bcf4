"""The transactional outbox, as SQL and message encoding; no I/O.

``tx.outbox.publish(topic, payload, key=...)`` inserts a row in the caller's transaction:
the message exists exactly when the transaction commits (a distributed one included). A
relay (``twophase.relay``) later delivers rows to a broker, at least once, each with a
stable ``msg_id`` consumers can de-duplicate on.

Order per key: every message is put in one of ``PARTITIONS`` partitions by a hash of its
key, and each partition is leased to one relay worker at a time, which delivers its rows in
id order and sends no message before the broker accepted every earlier pending one of its
key. Ids follow the order of the publish calls, so messages of one key published by
transactions that committed one after the other (for example, both updating the same
entity row before publishing) are delivered in that order, also across broker refusals,
relay crashes and with several workers; only a dead-lettered message is skipped. Messages
of one key published by *concurrent* transactions have no order to keep.
"""

from __future__ import annotations

import json
import uuid
import zlib
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Final

from .dialects import Dialect
from .errors import InvalidQuery

OUTBOX = "twophase_outbox"
LEASES = "twophase_outbox_lease"
WORKERS = "twophase_outbox_worker"

#: Fixed: a message's partition is computed when it is published.
PARTITIONS: Final = 32

PENDING, DELIVERED, DEAD = 0, 1, 2

Statement = tuple[str, tuple[Any, ...] | None]


class Message:
    """One outbox message, as the relay hands it to a broker (read-only).

    ``headers`` are decoded from their stored JSON text on first use: an adapter that
    forwards them as JSON (``headers_json``) never decodes them, and a message without
    headers costs nothing.
    """

    __slots__ = ("_headers", "_headers_json", "attempts", "id", "key", "msg_id", "payload", "topic")

    def __init__(
        self,
        id: int,
        msg_id: str,
        topic: str,
        key: str | None,
        payload: bytes,
        headers: dict[str, str] | None = None,
        attempts: int = 0,
        *,
        headers_json: str | None = None,
    ) -> None:
        self.id = id
        self.msg_id = msg_id
        self.topic = topic
        self.key = key
        self.payload = payload
        self.attempts = attempts
        self._headers = headers
        self._headers_json = headers_json if headers is None else None

    @property
    def headers(self) -> dict[str, str]:
        """The headers (str to str); do not modify the dict."""
        h = self._headers
        if h is None:
            text = self._headers_json
            h = json.loads(text) if text and text != "{}" else {}
            self._headers = h
        return h

    @property
    def headers_json(self) -> str:
        """The headers as JSON text, as stored."""
        text = self._headers_json
        if text is None:
            text = self._headers_json = json.dumps(self._headers) if self._headers else "{}"
        return text

    def __repr__(self) -> str:
        return (
            f"Message(id={self.id!r}, msg_id={self.msg_id!r}, topic={self.topic!r}, "
            f"key={self.key!r}, payload={self.payload[:40]!r}, headers={self.headers!r}, "
            f"attempts={self.attempts!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (
            self.id,
            self.msg_id,
            self.topic,
            self.key,
            self.payload,
            self.headers,
            self.attempts,
        ) == (
            other.id,
            other.msg_id,
            other.topic,
            other.key,
            other.payload,
            other.headers,
            other.attempts,
        )

    __hash__ = None  # type: ignore[assignment]


def partition_of(key: str | None, msg_id: str) -> int:
    """The partition of a message: by key, or spread by id when it has none."""
    basis = key if key is not None else msg_id
    return zlib.crc32(basis.encode()) % PARTITIONS


def encode_payload(payload: Any, headers: dict[str, str]) -> bytes:
    """bytes as they are, str as UTF-8, anything else as JSON (and say so in a header)."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, str):
        headers.setdefault("content-type", "text/plain; charset=utf-8")
        return payload.encode()
    try:
        text = json.dumps(payload, separators=(",", ":"), default=_json_extra)
    except (TypeError, ValueError) as exc:
        raise InvalidQuery(
            f"outbox payload of type {type(payload).__name__} is not bytes, str or "
            "JSON-serializable; encode it first"
        ) from exc
    headers.setdefault("content-type", "application/json")
    return text.encode()


def _json_extra(value: Any) -> Any:
    """The few non-JSON types with one obvious text form; anything else is refused."""
    if isinstance(value, datetime | date | time | Decimal | uuid.UUID):
        return value.isoformat() if hasattr(value, "isoformat") else str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def check_topic(topic: object) -> str:
    """Topics: non-empty str up to 255 characters, no NUL."""
    if not isinstance(topic, str) or not topic or len(topic) > 255 or "\0" in topic:
        raise InvalidQuery(
            f"outbox topic must be a non-empty str of at most 255 characters, got {topic!r:.80}"
        )
    return topic


class OutboxSQL:
    """SQL for the outbox tables of one database."""

    def __init__(self, dialect: Dialect) -> None:
        q = dialect.sql.quote_ident
        self.outbox, self.leases, self.workers = q(OUTBOX), q(LEASES), q(WORKERS)
        #: PostgreSQL: the relay settles a batch in one statement (MariaDB: a transaction).
        self.pg = dialect.name == "postgresql"
        self._now = "now()" if self.pg else "CURRENT_TIMESTAMP(6)"
        self._key = "key" if self.pg else "`key`"
        self._partition = "partition" if self.pg else "`partition`"

    def schema(self) -> tuple[str, ...]:
        """The message table and one lease row per partition.

        Pending messages are found through partial indexes (PostgreSQL) that hold only
        them, so their size follows the backlog, not the table: by id (the relay's fetch,
        when its partitions hold most of the backlog) and by partition and id (when it holds
        few of many busy partitions); the planner picks.
        """
        seed_values = ", ".join(f"({p})" for p in range(PARTITIONS))
        if self.pg:
            return (
                f"CREATE TABLE IF NOT EXISTS {self.outbox} ("
                " id bigserial PRIMARY KEY, msg_id uuid NOT NULL UNIQUE,"
                " topic varchar(255) NOT NULL, key varchar(255), partition smallint NOT NULL,"
                " payload bytea NOT NULL, headers text NOT NULL DEFAULT '{}',"
                " state smallint NOT NULL DEFAULT 0, attempts int NOT NULL DEFAULT 0,"
                " created_at timestamptz NOT NULL DEFAULT now(), delivered_at timestamptz,"
                " error text)",
                f"CREATE INDEX IF NOT EXISTS twophase_outbox_pending ON {self.outbox} "
                "(partition, id) WHERE state = 0",
                f"CREATE INDEX IF NOT EXISTS twophase_outbox_pending_id ON {self.outbox} "
                "(id) WHERE state = 0",
                f"CREATE INDEX IF NOT EXISTS twophase_outbox_dead ON {self.outbox} (id) "
                "WHERE state = 2",
                f"CREATE TABLE IF NOT EXISTS {self.leases} ("
                " partition smallint PRIMARY KEY, owner varchar(64),"
                " lease_until timestamptz NOT NULL DEFAULT '-infinity',"
                " backoff_until timestamptz NOT NULL DEFAULT '-infinity',"
                " failures int NOT NULL DEFAULT 0, delivered bigint NOT NULL DEFAULT 0)",
                f"INSERT INTO {self.leases} (partition) VALUES {seed_values} "
                "ON CONFLICT DO NOTHING",
                f"CREATE TABLE IF NOT EXISTS {self.workers} ("
                " worker varchar(128) PRIMARY KEY, seen_at timestamptz NOT NULL)",
            )
        # MariaDB has no partial indexes; (state, id) serves the fetch in id order and the
        # idle check, (state, partition, id) a fetch of few partitions.
        return (
            f"CREATE TABLE IF NOT EXISTS {self.outbox} ("
            " id BIGINT AUTO_INCREMENT PRIMARY KEY,"
            " msg_id CHAR(36) CHARACTER SET ascii NOT NULL UNIQUE,"
            " topic VARCHAR(255) NOT NULL, `key` VARCHAR(255), `partition` SMALLINT NOT NULL,"
            " payload LONGBLOB NOT NULL, headers TEXT NOT NULL,"
            " state SMALLINT NOT NULL DEFAULT 0, attempts INT NOT NULL DEFAULT 0,"
            " created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),"
            " delivered_at TIMESTAMP(6) NULL, error TEXT,"
            " KEY twophase_outbox_pending (state, `partition`, id),"
            " KEY twophase_outbox_pending_id (state, id)) ENGINE=InnoDB",
            f"CREATE TABLE IF NOT EXISTS {self.leases} ("
            " `partition` SMALLINT PRIMARY KEY, owner VARCHAR(64),"
            " lease_until TIMESTAMP(6) NOT NULL DEFAULT '1970-01-01 00:00:01',"
            " backoff_until TIMESTAMP(6) NOT NULL DEFAULT '1970-01-01 00:00:01',"
            " failures INT NOT NULL DEFAULT 0, delivered BIGINT NOT NULL DEFAULT 0"
            ") ENGINE=InnoDB",
            f"INSERT IGNORE INTO {self.leases} (`partition`) VALUES {seed_values}",
            f"CREATE TABLE IF NOT EXISTS {self.workers} ("
            " worker VARCHAR(128) NOT NULL PRIMARY KEY, seen_at TIMESTAMP(6) NOT NULL"
            ") ENGINE=InnoDB",
        )

    def publish(
        self, topic: str, payload: bytes, key: str | None, headers: dict[str, str]
    ) -> tuple[str, Statement]:
        """The insert of one message, and its msg_id."""
        msg_id = str(uuid.uuid4())
        return msg_id, (
            f"INSERT INTO {self.outbox} (msg_id, topic, {self._key}, {self._partition}, payload, "
            "headers) VALUES (%s, %s, %s, %s, %s, %s)",
            (msg_id, topic, key, partition_of(key, msg_id), payload, json.dumps(headers)),
        )

    # -- the relay's statements ---------------------------------------------------------

    def _in(self, values: list[int], cast: str) -> tuple[str, tuple[Any, ...]]:
        """``= ANY(array)`` on PostgreSQL: one parameter, so one statement text whatever the
        count (psycopg prepares it once; many placeholders are parsed on every call).
        MariaDB: ``IN (...)``."""
        if self.pg:
            return f"= ANY(%s::{cast}[])", (values,)
        return f"IN ({', '.join(['%s'] * len(values))})", tuple(values)

    def _seconds_from_now(self) -> str:
        return (
            "now() + make_interval(secs => %s)"
            if self.pg
            else "CURRENT_TIMESTAMP(6) + INTERVAL %s MICROSECOND"
        )

    def _amount(self, seconds: float) -> float | int:
        return seconds if self.pg else int(seconds * 1_000_000)

    def heartbeat(self, worker: str) -> Statement:
        """Say this worker is alive (it then counts when partitions are shared out)."""
        if self.pg:
            return (
                f"INSERT INTO {self.workers} (worker, seen_at) VALUES (%s, now()) "
                "ON CONFLICT (worker) DO UPDATE SET seen_at = now()",
                (worker,),
            )
        return (
            f"INSERT INTO {self.workers} (worker, seen_at) VALUES (%s, CURRENT_TIMESTAMP(6)) "
            "ON DUPLICATE KEY UPDATE seen_at = CURRENT_TIMESTAMP(6)",
            (worker,),
        )

    def live_workers(self, seconds: float) -> Statement:
        """How many workers sent a heartbeat within ``seconds``."""
        since = (
            "now() - make_interval(secs => %s)"
            if self.pg
            else "CURRENT_TIMESTAMP(6) - INTERVAL %s MICROSECOND"
        )
        return (
            f"SELECT COUNT(*) AS n FROM {self.workers} WHERE seen_at > {since}",
            (self._amount(seconds),),
        )

    def forget_worker(self, worker: str) -> Statement:
        """A worker leaving."""
        return (f"DELETE FROM {self.workers} WHERE worker = %s", (worker,))

    def take_leases(self, owner: str, seconds: float, limit: int) -> Statement:
        """Renew this worker's leases and take free (expired) ones, up to ``limit`` in all.

        Locked rows are skipped, so workers racing for partitions never block each other.
        """
        p = self._partition
        return (
            f"SELECT {p} AS p, owner FROM {self.leases} "
            f"WHERE owner = %s OR lease_until < {self._now} "
            f"ORDER BY (owner = %s) DESC, {p} LIMIT %s FOR UPDATE SKIP LOCKED",
            (owner, owner, limit),
        )

    def hold(self, owner: str, partitions: list[int], seconds: float) -> Statement:
        """Set the lease of ``partitions`` to ``owner`` for ``seconds``."""
        cond, params = self._in(partitions, "smallint")
        return (
            f"UPDATE {self.leases} SET owner = %s, lease_until = {self._seconds_from_now()} "
            f"WHERE {self._partition} {cond}",
            (owner, self._amount(seconds), *params),
        )

    def release(self, owner: str, partitions: list[int]) -> Statement:
        """Give leases back (on shutdown, or when holding more than a fair share)."""
        cond, params = self._in(partitions, "smallint")
        epoch = "'-infinity'" if self.pg else "'1970-01-01 00:00:01'"
        return (
            f"UPDATE {self.leases} SET owner = NULL, lease_until = {epoch} "
            f"WHERE owner = %s AND {self._partition} {cond}",
            (owner, *params),
        )

    def ready_partitions(self, owner: str) -> Statement:
        """This worker's partitions that are not backing off."""
        return (
            f"SELECT {self._partition} AS p FROM {self.leases} WHERE owner = %s "
            f"AND lease_until > {self._now} AND backoff_until <= {self._now}",
            (owner,),
        )

    def fetch(
        self, partitions: list[int], limit: int, in_flight: list[int] | None = None
    ) -> Statement:
        """The oldest pending messages of ``partitions``, in id order, leaving out
        ``in_flight`` (published, not marked yet).

        Columns, in this order: id, msg_id (text), topic, key, partition, payload,
        headers (JSON text), attempts.
        """
        cond, params = self._in(partitions, "smallint")
        msg_id = "msg_id::text" if self.pg else "msg_id"
        skip = ""
        if in_flight:
            # Most rows are past the in-flight batch; only those below its end are compared
            # with it (a message committed late can have a smaller id).
            out, out_params = self._in(in_flight, "bigint")
            skip = f"AND (id > %s OR NOT (id {out})) "
            params = (*params, max(in_flight), *out_params)
        return (
            f"SELECT id, {msg_id}, topic, {self._key}, {self._partition}, payload, headers, "
            f"attempts FROM {self.outbox} WHERE state = 0 AND {self._partition} {cond} "
            f"{skip}ORDER BY id LIMIT %s",
            (*params, limit),
        )

    def settle(self, ids: list[int], failed_partitions: list[int]) -> Statement:
        """PostgreSQL: mark messages delivered and add them to their partitions' delivered
        counters, in one statement; returns ``(p, n)``: how many were marked per partition.

        Only pending rows are marked (a message another worker marked meanwhile is not
        counted twice). The failure count of a partition that delivered and is not in
        ``failed_partitions`` starts again from zero.
        """
        return (
            f"WITH done AS (UPDATE {self.outbox} SET state = 1, delivered_at = now(), "
            "attempts = attempts + 1 WHERE id = ANY(%s::bigint[]) AND state = 0 "
            "RETURNING partition), "
            "counted AS (SELECT partition AS p, count(*) AS n FROM done GROUP BY partition) "
            f"UPDATE {self.leases} AS l SET delivered = l.delivered + counted.n, "
            "failures = CASE WHEN l.partition = ANY(%s::smallint[]) THEN l.failures ELSE 0 END "
            "FROM counted WHERE l.partition = counted.p RETURNING counted.p, counted.n",
            (ids, failed_partitions),
        )

    def lock_pending(self, ids: list[int]) -> Statement:
        """MariaDB, in a transaction: lock the still-pending ``ids``; ``(p, n)`` per
        partition."""
        cond, params = self._in(ids, "bigint")
        return (
            f"SELECT `partition` AS p, COUNT(*) AS n FROM {self.outbox} "
            f"WHERE id {cond} AND state = 0 GROUP BY `partition` FOR UPDATE",
            params,
        )

    def mark_delivered(self, ids: list[int]) -> Statement:
        """MariaDB, after ``lock_pending``: mark messages delivered."""
        cond, params = self._in(ids, "bigint")
        return (
            f"UPDATE {self.outbox} SET state = 1, delivered_at = {self._now}, "
            f"attempts = attempts + 1 WHERE id {cond} AND state = 0",
            params,
        )

    def count_delivered(self, counts: dict[int, int], failed_partitions: list[int]) -> Statement:
        """MariaDB, after ``mark_delivered``: add to the partitions' delivered counters; the
        failure count of those not in ``failed_partitions`` starts again from zero."""
        p = self._partition
        cases = " ".join(["WHEN %s THEN %s"] * len(counts))
        values = [v for item in counts.items() for v in item]
        keep, keep_params = self._in(failed_partitions or [-1], "smallint")
        cond, params = self._in(list(counts), "smallint")
        return (
            f"UPDATE {self.leases} SET delivered = delivered + CASE {p} {cases} ELSE 0 END, "
            f"failures = CASE WHEN {p} {keep} THEN failures ELSE 0 END WHERE {p} {cond}",
            (*values, *keep_params, *params),
        )

    def failed(self, msg: Message, error: str, dead: bool) -> Statement:
        """Count a failed attempt; after too many, the message is dead-lettered."""
        state = DEAD if dead else PENDING
        return (
            f"UPDATE {self.outbox} SET attempts = attempts + 1, error = %s, state = %s "
            "WHERE id = %s AND state = 0",
            (error[:2000], state, msg.id),
        )

    def back_off(self, partitions: list[int], base: float, cap: float) -> Statement:
        """Pause partitions after a failure: ``base`` seconds doubling with each failure in a
        row (the partition's ``failures``, kept in the table so a worker taking the
        partition over continues the count), at most ``cap``."""
        cond, params = self._in(partitions, "smallint")
        # Assigned before failures: MariaDB evaluates SET left to right with new values.
        if self.pg:
            until = "now() + make_interval(secs => LEAST(%s * power(2, LEAST(failures, 40)), %s))"
        else:
            until = (
                "CURRENT_TIMESTAMP(6) + INTERVAL CAST(LEAST(%s * POW(2, LEAST(failures, 40)), %s)"
                " * 1000000 AS SIGNED) MICROSECOND"
            )
        return (
            f"UPDATE {self.leases} SET backoff_until = {until}, failures = failures + 1 "
            f"WHERE {self._partition} {cond}",
            (base, cap, *params),
        )

    def any_pending(self) -> Statement:
        """One row when any message is pending (reads one index entry), else none."""
        return (f"SELECT 1 AS one FROM {self.outbox} WHERE state = 0 LIMIT 1", None)

    def lag(self) -> Statement:
        """Pending and dead counts, the age in seconds of the oldest pending message, and
        how many messages were delivered in all (each count reads an index)."""
        age = (
            "EXTRACT(EPOCH FROM now() - MIN(created_at))"
            if self.pg
            else "TIMESTAMPDIFF(MICROSECOND, MIN(created_at), CURRENT_TIMESTAMP(6)) / 1e6"
        )
        t = self.outbox
        return (
            f"SELECT (SELECT COUNT(*) FROM {t} WHERE state = 0) AS pending, "
            f"(SELECT COUNT(*) FROM {t} WHERE state = 2) AS dead, "
            f"(SELECT {age} FROM {t} WHERE state = 0) AS oldest_seconds, "
            f"(SELECT SUM(delivered) FROM {self.leases}) AS delivered",
            None,
        )
