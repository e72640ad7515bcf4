"""Broker adapters for the relay: Redis Streams, RabbitMQ (publisher confirms), NATS JetStream.

An adapter publishes a batch *in order* and reports, per message, None (the broker has it:
appended, confirmed or acknowledged) or the exception that stopped it. Every message carries
its outbox ``msg_id`` where consumers can de-duplicate on it: a Redis stream field, the AMQP
``message_id`` property, and the ``Nats-Msg-Id`` header (which JetStream itself de-duplicates
within its duplicate window).

What an error means to the relay:

- :class:`BrokerUnavailable` (raised for the whole call, or reported for a message): the
  broker could not be reached or did not answer in time. It says nothing about the message,
  so the attempt does not count towards dead-lettering; the relay backs off and reconnects.
- :class:`HeldBack` (reported): not sent, because an earlier message of the same key in the
  same call failed (adapters with ``orders_keys``; see :class:`Broker`).
- anything else (reported): the broker refused this message; one failed attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from ..errors import NotSupported
from ..outbox import Message

log = logging.getLogger("twophase.relay")


class BrokerUnavailable(ConnectionError):
    """The broker is unreachable or did not answer: no verdict on the message."""


class HeldBack(Exception):
    """Not sent: an earlier message of the same key failed in the same call."""

    def __init__(self) -> None:
        super().__init__("held back behind an earlier message of its key that failed")


class Broker(Protocol):
    """What the relay needs from a broker.

    ``publish`` sends the messages in the order given and reports on each. A message must not
    go out before the broker accepted every earlier message of its key in the same call; an
    adapter that sees to it sets a class attribute ``orders_keys = True`` and reports
    :class:`HeldBack` for the messages it kept back (the built-in ones do: Redis inside one
    script, the others through :func:`in_key_order`). For an adapter without it, the relay
    calls ``publish`` through :func:`in_key_order` itself (``key`` None: no order to keep).
    """

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


# -- Redis ---------------------------------------------------------------------------------

# One call per batch: XADD every message in order; a key whose XADD failed skips its later
# messages, other keys go on. KEYS are the batch's streams; ARGV[1] is MAXLEN ('' for none);
# ARGV[2] holds the messages, each a header '>IIIII' (its stream's index in KEYS, then the
# lengths of the four strings that follow: msg_id, key, payload, headers). The key comes
# prefixed with '=', so an empty key is still a key and '' is none. One string argument
# instead of four per message: redis-py packs each argument of a command separately, which
# would cost more than the rest of the relay. The reply: a string of one status per message
# ('0' appended, '1' held back, '2' failed), then the errors of the failed ones in order.
_XADD_IN_KEY_ORDER = """
local maxlen = ARGV[1]
local blob = ARGV[2]
local unpack, sub, pcall = struct.unpack, string.sub, redis.pcall
local size = #blob
local pos = 1
local failed = {}
local codes = {}
local out = {''}
while pos <= size do
  local k, l1, l2, l3, l4
  k, l1, l2, l3, l4, pos = unpack('>IIIII', blob, pos)
  local msg_id = sub(blob, pos, pos + l1 - 1)
  pos = pos + l1
  local order = sub(blob, pos, pos + l2 - 1)
  pos = pos + l2
  local payload = sub(blob, pos, pos + l3 - 1)
  pos = pos + l3
  local headers = sub(blob, pos, pos + l4 - 1)
  pos = pos + l4
  if l2 > 0 and failed[order] then
    codes[#codes + 1] = '1'
  else
    local r
    if maxlen == '' then
      r = pcall('XADD', KEYS[k], '*', 'msg_id', msg_id, 'key', sub(order, 2),
        'payload', payload, 'headers', headers)
    else
      r = pcall('XADD', KEYS[k], 'MAXLEN', '~', maxlen, '*', 'msg_id', msg_id,
        'key', sub(order, 2), 'payload', payload, 'headers', headers)
    end
    if type(r) == 'table' and r.err then
      codes[#codes + 1] = '2'
      out[#out + 1] = r.err
      if l2 > 0 then failed[order] = true end
    else
      codes[#codes + 1] = '0'
    end
  end
end
out[1] = table.concat(codes)
return out
"""
_HEADER = struct.Struct(">IIIII")

# Server states, not verdicts on a message: OOM (maxmemory), LOADING, BUSY (a long script),
# READONLY (a replica), MASTERDOWN, NOREPLICAS, TRYAGAIN, CLUSTERDOWN, MISCONF (disk errors).
_REDIS_UNAVAILABLE = (
    "OOM",
    "LOADING",
    "BUSY",
    "READONLY",
    "MASTERDOWN",
    "NOREPLICAS",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MISCONF",
)


class RedisStreams:
    """XADD to a stream named after the topic (``prefix`` + topic), one script call per batch.

    The batch runs as one Lua script: a single round trip, which stops a key at its first
    failed XADD (``orders_keys``). Redis runs nothing else meanwhile (a few ms for 500
    messages of 200 bytes). Needs scripting (EVALSHA); not Redis Cluster.
    """

    name = "redis"
    orders_keys = True

    def __init__(self, url: str, *, prefix: str = "", maxlen: int | None = None) -> None:
        self.url, self.prefix, self.maxlen = url, prefix, maxlen
        self._client: Any = None
        self._script: Any = None

    async def connect(self) -> None:
        """Connect (redis.asyncio)."""
        try:
            import redis.asyncio as redis
            from redis.exceptions import ConnectionError as RedisConnectionError
            from redis.exceptions import TimeoutError as RedisTimeoutError
        except ImportError as exc:
            raise NotSupported("the Redis relay needs: pip install 'twophase[redis]'") from exc
        if self._client is None:
            self._client = redis.from_url(self.url)
            self._script = self._client.register_script(_XADD_IN_KEY_ORDER)
        try:
            await self._client.ping()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"Redis at {_no_password(self.url)}: {exc}") from exc

    async def publish(self, messages: Sequence[Message]) -> list[BaseException | None]:
        """One script call for the batch; see the class."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import ResponseError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        prefix = self.prefix
        streams: dict[str, int] = {}
        parts: list[bytes] = []
        header = _HEADER.pack
        for m in messages:
            stream = prefix + m.topic
            index = streams.get(stream)
            if index is None:
                index = streams[stream] = len(streams) + 1
            msg_id = m.msg_id.encode()
            order = b"" if m.key is None else b"=" + m.key.encode()
            payload = m.payload
            headers = m.headers_json.encode()
            parts += (
                header(index, len(msg_id), len(order), len(payload), len(headers)),
                msg_id,
                order,
                payload,
                headers,
            )
        maxlen = "" if self.maxlen is None else str(self.maxlen)
        try:
            reply = await self._script(keys=list(streams), args=[maxlen, b"".join(parts)])
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"Redis: {exc}") from exc
        except ResponseError as exc:
            # The script as a whole was refused (OOM, BUSY, READONLY, ...): a server state.
            raise BrokerUnavailable(f"Redis refused the batch: {exc}") from exc
        errors = iter(reply[1:])
        out: list[BaseException | None] = []
        for code in reply[0]:
            if code == 48:  # '0'
                out.append(None)
            elif code == 49:  # '1'
                out.append(HeldBack())
            else:
                raw = next(errors)
                text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
                if text.startswith(_REDIS_UNAVAILABLE):
                    out.append(BrokerUnavailable(f"Redis: {text}"))
                else:
                    out.append(ResponseError(text))
        if len(out) != len(messages):
            raise BrokerUnavailable(f"Redis answered {len(out)} of {len(messages)} messages")
        return out

    async def close(self) -> None:
        """Close the client."""
        if self._client is not None:
            client, self._client, self._script = self._client, None, None
            with contextlib.suppress(Exception):
                await client.aclose()


# -- RabbitMQ ------------------------------------------------------------------------------


class RabbitMQ:
    """Publish with publisher confirms to an exchange (default: the default exchange, with
    the topic as routing key, so to the queue of that name), persistent, mandatory."""

    name = "rabbitmq"
    orders_keys = True

    def __init__(
        self,
        url: str,
        *,
        exchange: str = "",
        declare_queues: bool = True,
        confirm_timeout: float = 30.0,
    ) -> None:
        self.url, self.exchange_name, self.declare_queues = url, exchange, declare_queues
        self.confirm_timeout = confirm_timeout
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
        try:
            self._conn = await aio_pika.connect(self.url, timeout=self.confirm_timeout)
            self._channel = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
            self._exchange = (
                await self._channel.get_exchange(self.exchange_name)
                if self.exchange_name
                else self._channel.default_exchange
            )
        except (TimeoutError, ConnectionError, OSError) as exc:
            await self.close()
            raise BrokerUnavailable(f"RabbitMQ at {_no_password(self.url)}: {exc}") from exc
        self._declared.clear()

    def _check(self) -> None:
        # A closed channel answers every publish with an error; that is an outage, not a
        # per-message failure, so it must not count towards dead-lettering.
        if self._conn is None or self._conn.is_closed or self._channel.is_closed:
            raise BrokerUnavailable("the RabbitMQ connection or channel is closed")

    async def publish(self, messages: Sequence[Message]) -> list[BaseException | None]:
        """Publish in rounds (:func:`in_key_order`), each sent in order on one channel and
        then confirmed."""
        return await in_key_order(messages, self._send)

    async def _send(self, messages: Sequence[Message]) -> list[BaseException | None]:
        import aio_pika
        from aiormq.exceptions import DeliveryError

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
        # The publishes start in list order (frames go out on the channel in that order);
        # confirms are awaited together.
        results = await _answers(sends, self.confirm_timeout)
        self._check()
        return [
            r if r is None or isinstance(r, DeliveryError | BrokerUnavailable) else _outage(r)
            for r in results
        ]

    async def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 10)


# -- NATS JetStream ------------------------------------------------------------------------


class NatsJetStream:
    """JetStream publish with acks; subject = ``prefix`` + topic, ``Nats-Msg-Id`` = msg_id.

    With ``stream``, a stream of that name is created on connect (if missing) over
    ``subjects`` (default: everything under ``prefix``, or ``>``). ``ack_timeout`` bounds
    the wait for JetStream's acknowledgements.

    A JetStream publish is a core publish with a reply subject, answered by the stream with
    an ack (or an error) on it. nats-py's ``js.publish`` makes that a request per message
    (a task, a timer and a parsed ack object each); here every message of a round is
    published with its own reply subject under one inbox subscription, and the round waits
    for all acks at once, under one deadline: a third of the client's CPU per message.
    """

    name = "nats"
    orders_keys = True

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "",
        stream: str | None = None,
        subjects: Sequence[str] | None = None,
        ack_timeout: float = 5.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.url, self.prefix, self.stream = url, prefix, stream
        self.subjects = list(subjects) if subjects else [f"{prefix}>" if prefix else ">"]
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self._nc: Any = None
        self._lost: asyncio.Event | None = None
        self._inbox = ""
        self._acks: dict[str, asyncio.Future[None]] = {}
        self._seq = 0

    async def connect(self) -> None:
        """A new client each time; nats-py's own reconnecting is off (see below)."""
        try:
            from nats.aio.client import Client
        except ImportError as exc:
            raise NotSupported("the NATS relay needs: pip install 'twophase[nats]'") from exc
        await self.close()
        lost = asyncio.Event()

        async def on_lost() -> None:
            lost.set()

        nc = Client()
        try:
            # nats-py keeps retrying the server list inside connect() until
            # max_reconnect_attempts (default 60, reconnect_time_wait 2 s apart: minutes),
            # even with allow_reconnect=False; the relay has its own back-off, so one quick
            # retry at most, and a deadline over the whole call. With reconnecting on, a
            # dropped connection would park publishes in nats-py's buffer and pending acks
            # would wait out their timeouts; without it the client closes, and the relay
            # notices at once (``on_lost``) and connects anew.
            await asyncio.wait_for(
                nc.connect(
                    self.url,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    connect_timeout=max(1, round(self.connect_timeout)),
                    flush_timeout=self.ack_timeout,
                    error_cb=_nats_error,
                    disconnected_cb=on_lost,
                    closed_cb=on_lost,
                ),
                2 * self.connect_timeout + 1,
            )
            if self.stream:
                js = nc.jetstream(timeout=self.ack_timeout)
                try:
                    await js.stream_info(self.stream)
                except Exception as exc:
                    if _nats_outage(exc):
                        raise
                    await js.add_stream(name=self.stream, subjects=self.subjects)
            acks: dict[str, asyncio.Future[None]] = {}
            inbox = nc.new_inbox()
            await nc.subscribe(inbox + ".*", cb=_ack_handler(acks, len(inbox) + 1))
        except Exception as exc:
            await _close_nats(nc)
            if isinstance(exc, BrokerUnavailable) or not _nats_outage(exc):
                raise
            raise BrokerUnavailable(f"NATS at {_no_password(self.url)}: {exc!r}") from exc
        self._nc, self._lost, self._inbox, self._acks = nc, lost, inbox, acks

    async def publish(self, messages: Sequence[Message]) -> list[BaseException | None]:
        """Publish in rounds (:func:`in_key_order`), each sent in order on one connection and
        then acknowledged."""
        return await in_key_order(messages, self._send)

    async def _send(self, messages: Sequence[Message]) -> list[BaseException | None]:
        nc, lost, acks = self._nc, self._lost, self._acks
        if nc is None or lost is None or lost.is_set() or not nc.is_connected:
            raise BrokerUnavailable("the NATS connection is closed")
        loop = asyncio.get_running_loop()
        prefix, inbox = self.prefix, self._inbox + "."
        tokens: list[str] = []
        answers: list[asyncio.Future[None]] = []
        broken: BrokerUnavailable | None = None
        try:
            for m in messages:
                answer: asyncio.Future[None] = loop.create_future()
                answers.append(answer)
                if broken is not None:
                    answer.set_exception(broken)  # not sent: the connection failed
                    continue
                self._seq += 1
                token = str(self._seq)
                acks[token] = answer
                tokens.append(token)
                try:
                    await nc.publish(
                        prefix + m.topic,
                        m.payload,
                        reply=inbox + token,
                        headers={**m.headers, "Nats-Msg-Id": m.msg_id, "X-Key": m.key or ""},
                    )
                except Exception as exc:
                    # Refused before sending (MaxPayloadError, BadSubjectError, ...), or the
                    # connection failed, and then what follows is not sent either.
                    del acks[token]
                    if _nats_outage(exc):
                        broken = _outage(exc)
                        answer.set_exception(broken)
                    else:
                        answer.set_exception(exc)
            results = await _answers(answers, self.ack_timeout, lost)
        finally:
            for token in tokens:
                acks.pop(token, None)
        return [
            r
            if r is None or not _nats_outage(r) or isinstance(r, BrokerUnavailable)
            else _outage(r)
            for r in results
        ]

    async def close(self) -> None:
        """Close the connection (bounded: a dead link must not hang the relay)."""
        if self._nc is not None:
            nc, self._nc = self._nc, None
            await _close_nats(nc)
            for answer in self._acks.values():
                answer.cancel()
            self._acks = {}


def _ack_handler(
    acks: dict[str, asyncio.Future[None]], skip: int
) -> Callable[[Any], Awaitable[None]]:
    """The callback of the inbox subscription: settle the future of each answered message.

    JetStream answers ``{"stream": ..., "seq": ...}`` (``"duplicate": true`` when it dropped
    a re-send by its ``Nats-Msg-Id``: delivered all the same), ``{"error": {...}}``, or, if
    no stream takes the subject, a status 503 message ("no responders")."""
    import nats.js.errors

    async def on_ack(msg: Any) -> None:
        answer = acks.pop(msg.subject[skip:], None)
        if answer is None or answer.done():
            return
        data = msg.data
        if not data and msg.headers and msg.headers.get("Status") == "503":
            answer.set_exception(nats.js.errors.NoStreamResponseError())
        elif b'"error"' in data:
            try:
                error: dict[str, Any] = json.loads(data)["error"]
                # It raises the exception class that fits the code.
                nats.js.errors.APIError.from_error(error)
            except Exception as exc:
                answer.set_exception(exc)
            else:
                answer.set_exception(nats.js.errors.APIError(**error))
        else:
            answer.set_result(None)

    return on_ack


async def _close_nats(nc: Any) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 5)


async def _nats_error(exc: Exception) -> None:
    """nats-py's error callback; the default one logs a traceback for every failed attempt.
    What matters reaches the relay as exceptions anyway."""
    log.debug("nats: %r", exc)


def _nats_outage(exc: BaseException) -> bool:
    """A transport failure or a timeout (no verdict on the message), not a refusal."""
    import nats.errors
    import nats.js.errors

    return isinstance(
        exc,
        OSError
        | TimeoutError
        | nats.errors.ConnectionClosedError
        | nats.errors.StaleConnectionError
        | nats.errors.OutboundBufferLimitError
        | nats.errors.ConnectionDrainingError
        | nats.errors.ConnectionReconnectingError
        | nats.errors.NoServersError
        | nats.js.errors.ServiceUnavailableError,
    )


# -- shared --------------------------------------------------------------------------------


async def in_key_order(
    messages: Sequence[Message],
    send: Callable[[Sequence[Message]], Awaitable[list[BaseException | None]]],
) -> list[BaseException | None]:
    """Publish with ``send`` so that a key stops at its first failure: in rounds, round *n*
    holding the *n*-th message of each key (messages without a key go in the first), each
    sent once the previous one was answered. A batch with no key twice is one call.

    Messages of a key that failed are reported :class:`HeldBack`; once the broker is
    unavailable, the rounds not sent yet are reported :class:`BrokerUnavailable`. ``send``
    raising in the first round propagates (nothing was accepted).
    """
    rounds: list[list[int]] = [[]]
    depth: dict[str, int] = {}
    for i, m in enumerate(messages):
        n = 0
        if m.key is not None:
            n = depth.get(m.key, 0)
            depth[m.key] = n + 1
            if n == len(rounds):
                rounds.append([])
        rounds[n].append(i)
    if len(rounds) == 1:
        return await send(messages)
    results: list[BaseException | None] = [None] * len(messages)
    stopped: set[str | None] = set()
    for n, members in enumerate(rounds):
        sending = []
        for i in members:
            if messages[i].key in stopped:
                results[i] = HeldBack()
            else:
                sending.append(i)
        if not sending:
            continue
        try:
            answers = await send([messages[i] for i in sending])
        except Exception as exc:
            if n == 0:
                raise
            cut = BrokerUnavailable(f"{type(exc).__name__}: {exc}")
            cut.__cause__ = exc
            _cut_rest(results, rounds[n:], cut)
            return results
        outage = None
        for i, answer in zip(sending, answers, strict=True):
            results[i] = answer
            if answer is not None:
                if messages[i].key is not None:
                    stopped.add(messages[i].key)
                if isinstance(answer, BrokerUnavailable):
                    outage = answer
        if outage is not None:
            _cut_rest(results, rounds[n + 1 :], outage)
            return results
    return results


def _cut_rest(
    results: list[BaseException | None], rounds: list[list[int]], cut: BrokerUnavailable
) -> None:
    for members in rounds:
        for i in members:
            if not isinstance(results[i], HeldBack):
                results[i] = cut


async def _answers(
    sends: list[Any], timeout: float, lost: asyncio.Event | None = None
) -> list[BaseException | None]:
    """Run ``sends`` (started in list order) and collect each one's outcome.

    Bounded by ``timeout`` over all, and cut short when ``lost`` is set (the connection
    dropped: what was not answered yet never will be). Unanswered ones are cancelled and
    reported as :class:`BrokerUnavailable`.
    """
    tasks = [asyncio.ensure_future(s) for s in sends]
    everything = asyncio.gather(*tasks, return_exceptions=True)
    waiter = asyncio.ensure_future(lost.wait()) if lost is not None else None
    watched: list[asyncio.Future[Any]] = [everything]
    if waiter is not None:
        watched.append(waiter)
    try:
        await asyncio.wait(
            watched,
            timeout=timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        if waiter is not None:
            waiter.cancel()
    out: list[BaseException | None] = []
    cut = None
    for t in tasks:
        if not t.done():
            t.cancel()
            cut = cut or BrokerUnavailable(
                "the broker dropped the connection"
                if lost is not None and lost.is_set()
                else f"no answer from the broker within {timeout:g} s"
            )
            out.append(cut)
        elif t.cancelled():
            out.append(BrokerUnavailable("cancelled"))
        else:
            out.append(t.exception())
    if not everything.done():
        # Its children were cancelled above; let it finish so nothing is left pending.
        with contextlib.suppress(BaseException):
            await everything
    return out


def _outage(exc: BaseException) -> BrokerUnavailable:
    err = BrokerUnavailable(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def _no_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


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
