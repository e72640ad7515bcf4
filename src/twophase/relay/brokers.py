"""Broker adapters for the relay: Redis Streams, RabbitMQ (publisher confirms), NATS JetStream.

An adapter publishes a batch *in order* and reports, per message, None (the broker has it:
appended, confirmed or acknowledged) or the exception that stopped it. Every message carries
its outbox ``msg_id`` where consumers can de-duplicate on it: a Redis stream field, the AMQP
``message_id`` property, and the ``Nats-Msg-Id`` header (which JetStream itself de-duplicates
within its duplicate window).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from ..errors import NotSupported
from ..outbox import Message


class Broker(Protocol):
    """What the relay needs from a broker."""

    name: str

    async def connect(self) -> None:
        """Open the connection (called again after a failure)."""
        ...

    async def publish(self, messages: Sequence[Message]) -> list[BaseException | None]:
        """Publish in order; per message None when the broker has it, else the error."""
        ...

    async def close(self) -> None:
        """Close the connection."""
        ...


class RedisStreams:
    """XADD to a stream named after the topic (``prefix`` + topic), pipelined per batch."""

    name = "redis"

    def __init__(self, url: str, *, prefix: str = "", maxlen: int | None = None) -> None:
        self.url, self.prefix, self.maxlen = url, prefix, maxlen
        self._client: Any = None

    async def connect(self) -> None:
        """Connect (redis.asyncio)."""
        try:
            import redis.asyncio as redis
        except ImportError as exc:
            raise NotSupported("the Redis relay needs: pip install 'twophase[redis]'") from exc
        if self._client is None:
            self._client = redis.from_url(self.url)
        await self._client.ping()

    async def publish(self, messages: Sequence[Message]) -> list[BaseException | None]:
        """One pipeline (no MULTI): Redis runs the commands in order."""
        pipe = self._client.pipeline(transaction=False)
        for m in messages:
            pipe.xadd(
                self.prefix + m.topic,
                {
                    "msg_id": m.msg_id,
                    "key": m.key or "",
                    "payload": m.payload,
                    "headers": json.dumps(m.headers),
                },
                maxlen=self.maxlen,
                approximate=self.maxlen is not None,
            )
        results = await pipe.execute(raise_on_error=False)
        return [r if isinstance(r, BaseException) else None for r in results]

    async def close(self) -> None:
        """Close the client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class RabbitMQ:
    """Publish with publisher confirms to an exchange (default: the default exchange, with
    the topic as routing key, so to the queue of that name), persistent, mandatory."""

    name = "rabbitmq"

    def __init__(self, url: str, *, exchange: str = "", declare_queues: bool = True) -> None:
        self.url, self.exchange_name, self.declare_queues = url, exchange, declare_queues
        self._conn: Any = None
        self._channel: Any = None
        self._exchange: Any = None
        self._declared: set[str] = set()

    async def connect(self) -> None:
        """Connect and open a confirming channel that raises on unroutable messages."""
        try:
            import aio_pika
        except ImportError as exc:
            raise NotSupported(
                "the RabbitMQ relay needs: pip install 'twophase[rabbitmq]'"
            ) from exc
        await self.close()
        self._conn = await aio_pika.connect(self.url)
        self._channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        self._exchange = (
            await self._channel.get_exchange(self.exchange_name)
            if self.exchange_name
            else self._channel.default_exchange
        )
        self._declared.clear()

    def _check(self) -> None:
        # A closed channel answers every publish with an error; that is an outage, not a
        # per-message failure, so it must not count towards dead-lettering.
        if self._conn is None or self._conn.is_closed or self._channel.is_closed:
            raise ConnectionError("the RabbitMQ connection or channel is closed")

    async def publish(self, messages: Sequence[Message]) -> list[BaseException | None]:
        """Send the batch in order on one channel, then wait for every confirm."""
        import aio_pika

        self._check()

        if self.declare_queues and not self.exchange_name:
            for topic in {m.topic for m in messages} - self._declared:
                await self._channel.declare_queue(topic, durable=True)
                self._declared.add(topic)
        sends = [
            self._exchange.publish(
                aio_pika.Message(
                    m.payload,
                    message_id=m.msg_id,
                    headers={**m.headers, "x-key": m.key or ""},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=m.topic,
                mandatory=True,
            )
            for m in messages
        ]
        # gather starts the publishes in list order; frames go out on the channel in that
        # order, and confirms are awaited together.
        results = await asyncio.gather(*sends, return_exceptions=True)
        self._check()
        return [r if isinstance(r, BaseException) else None for r in results]

    async def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None


class NatsJetStream:
    """JetStream publish with acks; subject = ``prefix`` + topic, ``Nats-Msg-Id`` = msg_id.

    With ``stream``, a stream of that name is created on connect (if missing) over
    ``subjects`` (default: everything under ``prefix``, or ``>``).
    """

    name = "nats"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "",
        stream: str | None = None,
        subjects: Sequence[str] | None = None,
    ) -> None:
        self.url, self.prefix, self.stream = url, prefix, stream
        self.subjects = list(subjects) if subjects else [f"{prefix}>" if prefix else ">"]
        self._nc: Any = None
        self._js: Any = None

    async def connect(self) -> None:
        """Connect without nats-py's own reconnect loop: the relay retries with backoff."""
        try:
            import nats
        except ImportError as exc:
            raise NotSupported("the NATS relay needs: pip install 'twophase[nats]'") from exc
        await self.close()
        self._nc = await nats.connect(self.url, allow_reconnect=False, connect_timeout=5)
        self._js = self._nc.jetstream()
        if self.stream:
            try:
                await self._js.stream_info(self.stream)
            except Exception:
                await self._js.add_stream(name=self.stream, subjects=self.subjects)

    def _check(self) -> None:
        if self._nc is None or not self._nc.is_connected:
            raise ConnectionError("the NATS connection is closed")

    async def publish(self, messages: Sequence[Message]) -> list[BaseException | None]:
        """Publish the batch in order on one connection, then wait for every ack."""
        self._check()
        sends = [
            self._js.publish(
                self.prefix + m.topic,
                m.payload,
                headers={**m.headers, "Nats-Msg-Id": m.msg_id, "X-Key": m.key or ""},
            )
            for m in messages
        ]
        results = await asyncio.gather(*sends, return_exceptions=True)
        self._check()
        return [r if isinstance(r, BaseException) else None for r in results]

    async def close(self) -> None:
        """Close the connection."""
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = self._js = None


def broker_from_url(url: str, **options: Any) -> Broker:
    """``redis://``, ``amqp://`` / ``amqps://`` or ``nats://`` to an adapter.

    URL query options: ``prefix`` and ``maxlen`` (Redis), ``exchange`` (RabbitMQ),
    ``prefix`` and ``stream`` (NATS).
    """
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    base = url.split("?", 1)[0]
    scheme = parts.scheme.lower()
    if scheme in ("redis", "rediss", "unix"):
        maxlen = query.get("maxlen")
        return RedisStreams(
            base,
            prefix=query.get("prefix", options.get("prefix", "")),
            maxlen=int(maxlen) if maxlen else None,
        )
    if scheme in ("amqp", "amqps"):
        return RabbitMQ(base, exchange=query.get("exchange", options.get("exchange", "")))
    if scheme in ("nats", "tls"):
        return NatsJetStream(
            base,
            prefix=query.get("prefix", options.get("prefix", "")),
            stream=query.get("stream", options.get("stream")),
        )
    raise NotSupported(
        f"no relay broker for {parts.scheme!r} URLs; use redis://, amqp:// or nats://"
    )
