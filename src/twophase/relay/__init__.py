"""The outbox relay: committed outbox messages to Redis Streams, RabbitMQ or NATS JetStream."""

from __future__ import annotations

import asyncio
from typing import Any

from .._async.connect import connect_async
from .brokers import (
    Broker,
    BrokerUnavailable,
    HeldBack,
    NatsJetStream,
    RabbitMQ,
    RedisStreams,
    broker_from_url,
    in_key_order,
)
from .core import Lag, Relay, RelayStats


async def relay_async(
    url: str | None, to: str, *, until_idle: bool = False, **options: Any
) -> RelayStats:
    """Run one relay worker from the database at ``url`` to the broker at ``to``."""
    db = await connect_async(url)
    try:
        relay = Relay(db, broker_from_url(to), **options)
        return await relay.run(until_idle=until_idle)
    finally:
        await db.close()


def run_relay(url: str | None, to: str, *, until_idle: bool = False, **options: Any) -> RelayStats:
    """The blocking entry: one event loop for the worker's whole life (brokers' clients are
    async-only), not one per call."""
    return asyncio.run(relay_async(url, to, until_idle=until_idle, **options))


__all__ = [
    "Broker",
    "BrokerUnavailable",
    "HeldBack",
    "Lag",
    "NatsJetStream",
    "RabbitMQ",
    "RedisStreams",
    "Relay",
    "RelayStats",
    "broker_from_url",
    "in_key_order",
    "relay_async",
    "run_relay",
]
