"""Shared by the idempotency, outbox and relay tests: isolated outbox tables, the brokers read
directly (not through twophase), broker stop/start, and the delivery checks.

Isolation: the outbox and its lease table are one per database, and a relay delivers every
pending message of its database. A test that shared them would deliver other tests' messages
(and count them in ``lag()``), so each test gets its own: a schema on PostgreSQL (chosen with
``search_path`` in the URL; CREATE/DROP DATABASE on PostgreSQL checkpoints and can take
seconds) and a database on MariaDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import rawdb
from .child import Child, children  # noqa: F401  (the tests take them from here)

PG_URL = os.environ.get("TWOPHASE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MY_URL = os.environ.get("TWOPHASE_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
URLS = {"postgresql": PG_URL, "mysql": MY_URL}

REDIS_URL = "redis://127.0.0.1:6379"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
NATS_URL = "nats://127.0.0.1:4222"
BROKERS = ("redis", "rabbitmq", "nats")
PORTS = {"redis": 6379, "rabbitmq": 5672, "nats": 4222}


# -- isolated outbox databases -------------------------------------------------------------


@contextlib.contextmanager
def isolated_database(dialect: str) -> Iterator[str]:
    """The URL of a fresh, empty schema (PostgreSQL) or database (MariaDB), dropped after."""
    name = f"tp_ob_{uuid.uuid4().hex[:12]}"
    base = URLS[dialect]
    if dialect == "postgresql":
        rawdb.query(base, f"CREATE SCHEMA {name}")
        sep = "&" if "?" in base else "?"
        url = f"{base}{sep}options=-csearch_path%3D{name}"
        drop = f"DROP SCHEMA IF EXISTS {name} CASCADE"
    else:
        rawdb.query(base, f"CREATE DATABASE {name}")
        url = base.rsplit("/", 1)[0] + f"/{name}"
        drop = f"DROP DATABASE IF EXISTS {name}"
    try:
        yield url
    finally:
        rawdb.query(base, drop)


def query(url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    """rawdb.query for these URLs: rawdb passes its own ``options`` to psycopg, which would
    replace the ``search_path`` of an isolated PostgreSQL URL."""
    if not rawdb.is_pg(url):
        return rawdb.query(url, sql, params)
    import psycopg
    from psycopg.rows import dict_row

    with (
        psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=5) as conn,
        conn.cursor() as cur,
    ):
        cur.execute(sql, params)
        return list(cur.fetchall()) if cur.description else []


def outbox_rows(url: str, topic: str | None = None) -> list[dict[str, Any]]:
    """The outbox rows (of one topic), in id order, read with the driver."""
    k = '"key"' if rawdb.is_pg(url) else "`key`"
    where, params = ("WHERE topic = %s", (topic,)) if topic is not None else ("", None)
    rows = query(
        url,
        f"SELECT id, msg_id, topic, {k} AS k, state, attempts, error FROM twophase_outbox "
        f"{where} ORDER BY id",
        params,
    )
    return [{**r, "msg_id": str(r["msg_id"])} for r in rows]  # a uuid on PostgreSQL


def table_exists(url: str, table: str) -> bool:
    """Whether ``table`` exists in the URL's schema (PostgreSQL) or database (MariaDB)."""
    if rawdb.is_pg(url):
        rows = query(url, "SELECT to_regclass(%s) IS NOT NULL AS e", (table,))
    else:
        rows = query(
            url,
            "SELECT COUNT(*) > 0 AS e FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name = %s",
            (table,),
        )
    return bool(rows[0]["e"])


# -- what a broker holds ----------------------------------------------------------------------


@dataclass(frozen=True)
class Delivered:
    """One message as a consumer of the broker sees it."""

    msg_id: str
    key: str
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)


class BrokerCase:
    """One broker with a topic (and a stream, for NATS) of its own for one test."""

    kind: str

    def __init__(self) -> None:
        # Valid as a Redis key, an AMQP queue name and a NATS subject.
        self.topic = f"tp.ob.{uuid.uuid4().hex[:12]}"

    @property
    def url(self) -> str:
        """The broker URL for ``run_relay`` / ``broker_from_url``."""
        raise NotImplementedError

    def adapter(self) -> Any:
        """A new relay adapter for this broker."""
        from twophase.relay import broker_from_url

        return broker_from_url(self.url)

    def spec(self) -> str:
        """What a child process needs to build the adapter (see relay_worker.py)."""
        return json.dumps({"url": self.url})

    async def setup(self) -> None:
        return None

    async def read(self) -> list[Delivered]:
        """Everything the broker holds for the topic, in the broker's order."""
        raise NotImplementedError

    async def cleanup(self) -> None:
        raise NotImplementedError


class RedisCase(BrokerCase):
    kind = "redis"

    @property
    def url(self) -> str:
        return REDIS_URL

    async def read(self) -> list[Delivered]:
        import redis.asyncio as redis

        client = redis.from_url(REDIS_URL)
        try:
            entries = await client.xrange(self.topic, "-", "+")
        finally:
            await client.aclose()
        return [
            Delivered(
                f[b"msg_id"].decode(),
                f[b"key"].decode(),
                f[b"payload"],
                json.loads(f[b"headers"]),
            )
            for _, f in entries
        ]

    async def cleanup(self) -> None:
        import redis.asyncio as redis

        client = redis.from_url(REDIS_URL)
        try:
            await client.delete(self.topic)
        finally:
            await client.aclose()


class RabbitCase(BrokerCase):
    kind = "rabbitmq"

    @property
    def url(self) -> str:
        return AMQP_URL

    async def read(self) -> list[Delivered]:
        """Everything in the queue, in queue order (consumed: a second read finds the rest).

        A consumer with a large prefetch: one basic.get per message is a round trip each.
        """
        import aio_pika
        import aiormq

        conn = await aio_pika.connect(AMQP_URL)
        try:
            channel = await conn.channel()
            try:
                queue = await channel.declare_queue(self.topic, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return []  # the relay declares the queue on its first publish
            total = queue.declaration_result.message_count or 0
            out: list[Delivered] = []
            if not total:
                return out
            await channel.set_qos(prefetch_count=1000)
            async with asyncio.timeout(30), queue.iterator(no_ack=True) as messages:
                async for msg in messages:
                    headers = {k: _text(v) for k, v in (msg.headers or {}).items()}
                    key = headers.pop("x-key")
                    out.append(Delivered(str(msg.message_id), key, msg.body, headers))
                    if len(out) == total:
                        break
            return out
        finally:
            await conn.close()

    async def cleanup(self) -> None:
        import aio_pika

        conn = await aio_pika.connect(AMQP_URL)
        try:
            channel = await conn.channel()
            await channel.queue_delete(self.topic)
        finally:
            await conn.close()


class NatsCase(BrokerCase):
    kind = "nats"

    def __init__(self) -> None:
        super().__init__()
        self.stream = f"TPOB_{uuid.uuid4().hex[:12].upper()}"

    @property
    def url(self) -> str:
        # broker_from_url alone would make a stream over every subject (">"); ours exists.
        return f"{NATS_URL}?stream={self.stream}"

    def adapter(self) -> Any:
        from twophase.relay import NatsJetStream

        return NatsJetStream(NATS_URL, stream=self.stream, subjects=[self.topic])

    def spec(self) -> str:
        return json.dumps({"url": NATS_URL, "stream": self.stream, "subjects": [self.topic]})

    async def setup(self) -> None:
        """Create the stream, so relays built from ``url`` alone find it."""
        import nats

        nc = await nats.connect(NATS_URL)
        try:
            await nc.jetstream().add_stream(name=self.stream, subjects=[self.topic])
        finally:
            await nc.close()

    async def read(self) -> list[Delivered]:
        """Everything in the stream, through an ephemeral pull consumer."""
        import nats
        from nats.errors import TimeoutError as NatsTimeout

        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            info = await js.stream_info(self.stream)
            total = info.state.messages
            out: list[Delivered] = []
            if not total:
                return out
            sub = await js.pull_subscribe(self.topic, stream=self.stream)
            deadline = time.monotonic() + 20
            while len(out) < total and time.monotonic() < deadline:
                try:
                    batch = await sub.fetch(min(500, total - len(out)), timeout=2)
                except NatsTimeout:
                    continue
                for msg in batch:
                    headers = dict(msg.headers or {})
                    msg_id = headers.pop("Nats-Msg-Id")
                    key = headers.pop("X-Key")
                    out.append(Delivered(msg_id, key, msg.data, headers))
                    await msg.ack()
            await sub.unsubscribe()
            return out
        finally:
            await nc.close()

    async def cleanup(self) -> None:
        import nats

        nc = await nats.connect(NATS_URL)
        try:
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(self.stream)
        finally:
            await nc.close()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def make_case(kind: str) -> BrokerCase:
    return {"redis": RedisCase, "rabbitmq": RabbitCase, "nats": NatsCase}[kind]()


# -- delivery checks ---------------------------------------------------------------------------


def check_delivery(
    published: Sequence[tuple[str, str | None]],
    delivered: Iterable[Delivered],
    *,
    max_duplicates: int = 0,
) -> list[str]:
    """Assert every published (msg_id, key) arrived, nothing else did, per-key order holds in
    the sequence of first occurrences, and re-sends (at most ``max_duplicates``) repeat an
    id already seen. Returns the duplicated ids, in the order they were re-sent."""
    ids = [d.msg_id for d in delivered]
    keys = dict(published)
    unknown = [i for i in ids if i not in keys]
    assert not unknown, f"{len(unknown)} delivered ids were never published: {unknown[:5]}"
    seen: set[str] = set()
    firsts: list[str] = []
    dups: list[str] = []
    for d in delivered:
        if d.msg_id in seen:
            dups.append(d.msg_id)
        else:
            seen.add(d.msg_id)
            firsts.append(d.msg_id)
        # The key travels with the message (None as the empty string).
        assert d.key == (keys[d.msg_id] or ""), d
    missing = [m for m, _ in published if m not in seen]
    assert not missing, f"{len(missing)} of {len(published)} messages never arrived"
    assert len(dups) <= max_duplicates, f"{len(dups)} duplicates (allowed {max_duplicates})"
    for key in {k for _, k in published if k is not None}:
        want = [m for m, k in published if k == key]
        got = [m for m in firsts if keys[m] == key]
        assert got == want, f"order of key {key!r} broken"
    return dups


# -- services ------------------------------------------------------------------------------


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _run(*cmd: str, check: bool = True) -> None:
    subprocess.run(list(cmd), check=check, capture_output=True, timeout=120)


def stop_broker(kind: str) -> None:
    """Stop the broker and wait until its port is closed."""
    if kind == "redis":
        _run("redis-cli", "shutdown", "nosave", check=False)
    elif kind == "nats":
        _run("start-stop-daemon", "--stop", "--exec", "/usr/sbin/nats-server", check=False)
    else:
        # Stops the broker application (connections are closed, the port too); the Erlang
        # node stays, so it comes back in seconds instead of a full node start-up.
        _run("rabbitmqctl", "stop_app")
    rawdb.poll(lambda: not port_open(PORTS[kind]), timeout=60, what=f"{kind} to stop")


def start_broker(kind: str) -> None:
    """Start the broker (if it is down) and wait until it serves again."""
    if kind == "redis":
        if not port_open(6379):
            _run(
                "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1",
                "--port", "6379", "--save", "", "--appendonly", "no",
                "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
            )  # fmt: skip
        rawdb.poll(_redis_ready, timeout=30, what="Redis")
    elif kind == "nats":
        if not port_open(4222):
            _run(
                "start-stop-daemon", "--start", "--oknodo", "--background",
                "--exec", "/usr/sbin/nats-server", "--", "-a", "127.0.0.1", "-p", "4222",
                "-js", "-sd", "/var/lib/nats-server", "-l", "/var/log/nats-server.log",
            )  # fmt: skip
        rawdb.poll(lambda: asyncio.run(_nats_ready()), timeout=30, what="NATS JetStream")
    else:
        if not port_open(5672):
            started = subprocess.run(
                ["rabbitmqctl", "start_app"], check=False, capture_output=True, timeout=120
            )
            if started.returncode != 0:  # the node itself is down: start it whole
                _run("rabbitmq-server", "-detached")
        rawdb.poll(lambda: asyncio.run(_amqp_ready()), timeout=90, what="RabbitMQ")


def ensure_brokers() -> None:
    """Every broker up (for finally blocks: services must stay running)."""
    for kind in BROKERS:
        start_broker(kind)


def _redis_ready() -> bool:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
    try:
        return bool(client.ping())
    finally:
        client.close()


async def _nats_ready() -> bool:
    import nats

    nc = await nats.connect(NATS_URL, allow_reconnect=False, connect_timeout=2)
    try:
        await nc.jetstream().account_info()
        return True
    finally:
        await nc.close()


async def _amqp_ready() -> bool:
    import aio_pika

    conn = await aio_pika.connect(AMQP_URL, timeout=5)
    await conn.close()
    return True
