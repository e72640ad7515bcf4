"""The transactional outbox, as SQL and message encoding; no I/O.

``tx.outbox.publish(topic, payload, key=...)`` inserts a row in the caller's transaction:
the message exists exactly when the transaction commits (a distributed one included). A
relay (``twophase.relay``) later delivers rows to a broker, at least once, each with a
stable ``msg_id`` consumers can de-duplicate on.

Order per key: every message is put in one of ``PARTITIONS`` partitions by a hash of its
key, and each partition is leased to one relay worker at a time, which delivers its rows in
id order. Messages of one key published by transactions that committed one after the
other (for example, both updating the same entity row) are therefore delivered in that
order, also across relay crashes and with several workers. Messages of one key published by
*concurrent* transactions have no order to keep.
"""

from __future__ import annotations

import json
import uuid
import zlib
from dataclasses import dataclass, field
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


@dataclass(frozen=True, slots=True)
class Message:
    """One outbox message, as the relay hands it to a broker."""

    id: int
    msg_id: str
    topic: str
    key: str | None
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)
    attempts: int = 0


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
        self._pg = dialect.name == "postgresql"
        self._now = "now()" if self._pg else "CURRENT_TIMESTAMP(6)"
        self._key = "key" if self._pg else "`key`"
        self._partition = "partition" if self._pg else "`partition`"

    def schema(self) -> tuple[str, ...]:
        """The message table and one lease row per partition."""
        seed_values = ", ".join(f"({p})" for p in range(PARTITIONS))
        if self._pg:
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
        return (
            f"CREATE TABLE IF NOT EXISTS {self.outbox} ("
            " id BIGINT AUTO_INCREMENT PRIMARY KEY,"
            " msg_id CHAR(36) CHARACTER SET ascii NOT NULL UNIQUE,"
            " topic VARCHAR(255) NOT NULL, `key` VARCHAR(255), `partition` SMALLINT NOT NULL,"
            " payload LONGBLOB NOT NULL, headers TEXT NOT NULL,"
            " state SMALLINT NOT NULL DEFAULT 0, attempts INT NOT NULL DEFAULT 0,"
            " created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),"
            " delivered_at TIMESTAMP(6) NULL, error TEXT,"
            " KEY twophase_outbox_pending (state, `partition`, id)) ENGINE=InnoDB",
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

    def heartbeat(self, worker: str) -> Statement:
        """Say this worker is alive (it then counts when partitions are shared out)."""
        if self._pg:
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
            if self._pg
            else "CURRENT_TIMESTAMP(6) - INTERVAL %s MICROSECOND"
        )
        amount: float | int = seconds if self._pg else int(seconds * 1_000_000)
        return (f"SELECT COUNT(*) AS n FROM {self.workers} WHERE seen_at > {since}", (amount,))

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
        marks = ", ".join(["%s"] * len(partitions))
        until = (
            "now() + make_interval(secs => %s)"
            if self._pg
            else "CURRENT_TIMESTAMP(6) + INTERVAL %s MICROSECOND"
        )
        amount: float | int = seconds if self._pg else int(seconds * 1_000_000)
        return (
            f"UPDATE {self.leases} SET owner = %s, lease_until = {until} "
            f"WHERE {self._partition} IN ({marks})",
            (owner, amount, *partitions),
        )

    def release(self, owner: str, partitions: list[int]) -> Statement:
        """Give leases back (on shutdown, or when holding more than a fair share)."""
        marks = ", ".join(["%s"] * len(partitions))
        epoch = "'-infinity'" if self._pg else "'1970-01-01 00:00:01'"
        return (
            f"UPDATE {self.leases} SET owner = NULL, lease_until = {epoch} "
            f"WHERE owner = %s AND {self._partition} IN ({marks})",
            (owner, *partitions),
        )

    def ready_partitions(self, owner: str) -> Statement:
        """This worker's partitions that are not backing off."""
        return (
            f"SELECT {self._partition} AS p FROM {self.leases} WHERE owner = %s "
            f"AND lease_until > {self._now} AND backoff_until <= {self._now}",
            (owner,),
        )

    def fetch(self, partitions: list[int], limit: int) -> Statement:
        """The oldest pending messages of ``partitions``, in id order."""
        marks = ", ".join(["%s"] * len(partitions))
        return (
            f"SELECT id, msg_id, topic, {self._key} AS msg_key, {self._partition} AS part, "
            "payload, headers, attempts "
            f"FROM {self.outbox} WHERE state = 0 AND {self._partition} IN ({marks}) "
            "ORDER BY id LIMIT %s",
            (*partitions, limit),
        )

    def delivered(self, ids: list[int]) -> Statement:
        """Mark messages delivered."""
        marks = ", ".join(["%s"] * len(ids))
        return (
            f"UPDATE {self.outbox} SET state = 1, delivered_at = {self._now}, "
            f"attempts = attempts + 1 WHERE id IN ({marks})",
            tuple(ids),
        )

    def count_delivered(self, partition: int, n: int) -> Statement:
        """Add to a partition's delivered counter (the relay's progress figure)."""
        return (
            f"UPDATE {self.leases} SET delivered = delivered + %s, failures = 0 "
            f"WHERE {self._partition} = %s",
            (n, partition),
        )

    def failed(self, msg: Message, error: str, dead: bool) -> Statement:
        """Count a failed attempt; after too many, the message is dead-lettered."""
        state = DEAD if dead else PENDING
        return (
            f"UPDATE {self.outbox} SET attempts = attempts + 1, error = %s, state = %s "
            "WHERE id = %s",
            (error[:2000], state, msg.id),
        )

    def back_off(self, partitions: list[int], seconds: float) -> Statement:
        """Pause partitions after a broker failure."""
        marks = ", ".join(["%s"] * len(partitions))
        until = (
            "now() + make_interval(secs => %s)"
            if self._pg
            else "CURRENT_TIMESTAMP(6) + INTERVAL %s MICROSECOND"
        )
        amount: float | int = seconds if self._pg else int(seconds * 1_000_000)
        return (
            f"UPDATE {self.leases} SET backoff_until = {until}, failures = failures + 1 "
            f"WHERE {self._partition} IN ({marks})",
            (amount, *partitions),
        )

    def lag(self) -> Statement:
        """Pending and dead counts, the age in seconds of the oldest pending message, and
        how many messages were delivered in all (each count reads an index)."""
        age = (
            "EXTRACT(EPOCH FROM now() - MIN(created_at))"
            if self._pg
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
