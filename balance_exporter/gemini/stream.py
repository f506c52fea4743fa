"""Gemini's WebSocket API for one account-scoped key: the signed upgrade, the `balances@account`
subscription, pings, and the frames, each handed on parsed. It knows the protocol, not what a
frame means to the exporter: one connection per call, which ends by raising why it ended.
"""

import asyncio
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from balance_exporter.config import Credentials
from balance_exporter.gemini.errors import MalformedReply
from balance_exporter.gemini.nonce import NonceSource
from balance_exporter.gemini.replies import BalanceUpdate, StreamAnswer, parse_stream_message
from balance_exporter.gemini.signing import stream_headers

CHANNEL = "balances@account"
SUBSCRIBE_ID = 1
# A message past this closes the connection (a frame of 2,000 assets is about 100 KiB).
MAX_MESSAGE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StreamTiming:
    """How a connection is kept honest (tests shorten them)."""

    ping_seconds: float = 30.0  # a ping this often
    pong_seconds: float = 10.0  # a pong within this, or the connection is dead
    idle_seconds: float = 90.0  # any message (pongs count) within this
    subscribe_seconds: float = 10.0  # the subscription's answer within this
    upgrade_seconds: float = 10.0


TIMING = StreamTiming()


class StreamEnded(Exception):
    """Why a connection ended: `reason` is one of a bounded set (a metric label)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class StreamRejected(StreamEnded):
    """The upgrade was refused (401/403): the key, its nonce kind or its roles."""

    def __init__(self, status: int) -> None:
        super().__init__("rejected", f"HTTP {status}")
        self.status = status


@dataclass(frozen=True)
class StreamHandlers:
    on_subscribed: Callable[[], None]
    on_update: Callable[[BalanceUpdate], None]
    on_malformed: Callable[[str], None]


async def stream_balances(
    session: aiohttp.ClientSession, url: str, credentials: Credentials, nonces: NonceSource,
    handlers: StreamHandlers, proxy_url: str | None = None, tls: ssl.SSLContext | None = None,
    timing: StreamTiming | None = None,
) -> None:
    """One connection: upgrade, subscribe, read. Never returns normally: it raises StreamEnded
    (StreamRejected for a refused upgrade) when the connection ends or is given up on."""
    timing = timing or TIMING
    headers = stream_headers(credentials.api_key, credentials.api_secret, nonces.next())
    try:
        socket = await asyncio.wait_for(session.ws_connect(
            url, headers=headers, proxy=proxy_url, ssl=tls if tls is not None else True,
            # aiohttp refuses a message as long as its limit: one of MAX_MESSAGE_BYTES passes.
            autoping=False, max_msg_size=MAX_MESSAGE_BYTES + 1), timing.upgrade_seconds)
    except aiohttp.WSServerHandshakeError as error:
        if error.status in (401, 403):
            raise StreamRejected(error.status) from None
        raise StreamEnded("upgrade_failed", f"HTTP {error.status}") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as error:
        raise StreamEnded("connect_failed", type(error).__name__) from None
    async with socket:
        await socket.send_str(json.dumps({"id": SUBSCRIBE_ID, "method": "subscribe",
                                          "params": [CHANNEL]}))
        await _read(socket, handlers, timing)


async def _read(socket: aiohttp.ClientWebSocketResponse, handlers: StreamHandlers,
                timing: StreamTiming) -> None:
    now = time.monotonic()
    subscribe_by: float | None = now + timing.subscribe_seconds
    last_message, next_ping = now, now + timing.ping_seconds
    pong_by: float | None = None
    while True:
        deadline = min(next_ping, last_message + timing.idle_seconds,
                       *(moment for moment in (pong_by, subscribe_by) if moment is not None))
        try:
            message = await socket.receive(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            now = time.monotonic()
            if subscribe_by is not None and now >= subscribe_by:
                raise StreamEnded("subscribe_timeout") from None
            if pong_by is not None and now >= pong_by:
                raise StreamEnded("pong_timeout") from None
            if now >= last_message + timing.idle_seconds:
                raise StreamEnded("idle_timeout") from None
            if now >= next_ping:
                await socket.ping()
                pong_by, next_ping = now + timing.pong_seconds, now + timing.ping_seconds
            continue
        last_message = time.monotonic()
        if message.type == aiohttp.WSMsgType.PING:
            await socket.pong(message.data)
        elif message.type == aiohttp.WSMsgType.PONG:
            pong_by = None
        elif message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            if _handle(message.data, handlers, subscribe_by is not None):
                subscribe_by = None
        elif message.type == aiohttp.WSMsgType.ERROR and isinstance(
                message.data, aiohttp.WebSocketError) and (
                message.data.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG):
            raise StreamEnded("frame_too_large")
        else:  # closed by Gemini, or the connection broke
            raise StreamEnded("closed", str(message.type.name).lower())


def _handle(data: str | bytes, handlers: StreamHandlers, subscribing: bool) -> bool:
    """Hand on one message; True when it is the subscription's good answer."""
    try:
        message = parse_stream_message(data)
    except MalformedReply as error:
        handlers.on_malformed(str(error))
        return False
    if isinstance(message, BalanceUpdate):
        handlers.on_update(message)
    # The id as sent, or as its text: an answer is ours either way.
    elif isinstance(message, StreamAnswer) and str(message.id) == str(SUBSCRIBE_ID) and (
            subscribing):
        if message.status != 200:
            raise StreamEnded("subscribe_failed", f"status {message.status}")
        handlers.on_subscribed()
        return True
    return False
