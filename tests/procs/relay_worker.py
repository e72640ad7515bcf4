"""Child process for tests/test_relay.py: one relay worker, killed with SIGKILL by the parent.

Usage: relay_worker.py DB_URL BROKER_SPEC BATCH LEASE_SECONDS [HANG_AT]

BROKER_SPEC is JSON: ``{"url": ...}`` (an adapter from ``broker_from_url``), plus ``stream``
and ``subjects`` for NATS. The worker prints ``BATCH <n>`` after each delivered batch and
``DONE <n>`` when nothing is left. With HANG_AT, the HANG_AT-th publish to the broker is
followed by ``PUBLISHED <acked>`` and a hang: the broker has the batch, the outbox does not
know yet, which is the window a crash between the two leaves open.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import twophase
from twophase.outbox import Message
from twophase.relay import NatsJetStream, Relay, broker_from_url


def announce(line: str) -> None:
    # The parent blocks on these lines; without the flush they would sit in the pipe buffer.
    print(line, flush=True)


def make_broker(spec: dict[str, Any]) -> Any:
    if "stream" in spec:
        return NatsJetStream(spec["url"], stream=spec["stream"], subjects=spec["subjects"])
    return broker_from_url(spec["url"])


def hang_after(broker: Any, nth: int) -> None:
    """Wrap the real adapter's publish: after the nth batch is acknowledged, stop forever."""
    publish = broker.publish
    calls = 0

    async def publish_then_maybe_hang(messages: Sequence[Message]) -> list[Any]:
        nonlocal calls
        results = await publish(messages)
        calls += 1
        if calls == nth:
            announce(f"PUBLISHED {sum(r is None for r in results)}")
            await asyncio.Event().wait()
        return list(results)

    broker.publish = publish_then_maybe_hang


async def main(url: str, spec: str, batch: int, lease: float, hang_at: int | None) -> None:
    db = await twophase.connect_async(url)
    broker = make_broker(json.loads(spec))
    if hang_at is not None:
        hang_after(broker, hang_at)
    relay = Relay(db, broker, batch=batch, lease_seconds=lease)
    stats = await relay.run(until_idle=True, on_batch=lambda n: announce(f"BATCH {n}"))
    announce(f"DONE {stats.delivered}")
    await db.close()


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(
        main(
            args[0], args[1], int(args[2]), float(args[3]), int(args[4]) if len(args) > 4 else None
        )
    )
