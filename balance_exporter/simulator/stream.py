"""The simulated Gemini's WebSocket API: `balances@account` for account-scoped keys.

Authentication is the upgrade's, by Gemini's rules: `X-GEMINI-APIKEY`, `X-GEMINI-NONCE` (time-based,
within 30 s of now), `X-GEMINI-PAYLOAD` (base64 of the nonce's text) and `X-GEMINI-SIGNATURE`
(hex HMAC-SHA384 of the payload); a master key gets 401. A subscribed connection gets a
`balanceUpdate` frame with the changed assets whenever its account's balances change (drift, the
control API). Faults for the control API: drop every connection, go silent without closing,
send a garbage frame, send a 2 MiB frame, flood 1,000 frames in a second, answer the next
upgrade with 401.
"""

import asyncio
import base64
import binascii
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import WSMsgType, web

from balance_exporter.simulator.private_api import STATE_KEY, signed_by
from balance_exporter.simulator.state import SimAccount

TIME_BASED_NONCE_WINDOW_SECONDS = 30
CHANNEL = "balances@account"
HUGE_FRAME_BYTES = 2 * 1024 * 1024
FLOOD_FRAMES = 1000
StreamFault = Literal["drop", "silent", "garbage", "huge", "flood", "reject_next"]
STREAM_FAULTS: tuple[StreamFault, ...] = ("drop", "silent", "garbage", "huge", "flood",
                                          "reject_next")


@dataclass(eq=False)
class StreamConnection:
    socket: web.WebSocketResponse
    account: SimAccount
    subscriptions: set[str] = field(default_factory=set)
    silent: bool = False  # answers nothing, sends nothing, closes nothing

    async def send(self, text: str) -> None:
        if not self.silent and not self.socket.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.socket.send_str(text)


@dataclass
class StreamHub:
    """Every open connection, and what the next upgrade meets."""

    connections: set[StreamConnection] = field(default_factory=set)
    reject_next: bool = False
    upgrades: int = 0
    rejected: int = 0
    frames_sent: int = 0
    _tasks: set["asyncio.Task[None]"] = field(default_factory=set)

    def balances_changed(self, account: SimAccount, currencies: list[str]) -> None:
        """Push a frame with the changed assets to every subscriber of the account."""
        frame = balance_frame(account, currencies)
        for connection in list(self.connections):
            if connection.account is account and CHANNEL in connection.subscriptions:
                self._spawn(connection.send(frame))
                self.frames_sent += 1

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def fault(self, kind: StreamFault, size_bytes: int = HUGE_FRAME_BYTES) -> None:
        if kind == "reject_next":
            self.reject_next = True
            return
        for connection in list(self.connections):
            if kind == "drop":
                await connection.socket.close()
            elif kind == "silent":
                connection.silent = True
            elif kind == "garbage":
                await connection.send('{"e": "balanceUpdate", "B": [')
            elif kind == "huge":  # a message of `size_bytes`, an event nobody subscribed to
                await connection.send(_noise(size_bytes))
            else:
                self._spawn(_flood(connection))


def _noise(size_bytes: int) -> str:
    empty = json.dumps({"e": "noise", "pad": ""})
    return json.dumps({"e": "noise", "pad": "x" * max(0, size_bytes - len(empty))})


async def _flood(connection: StreamConnection) -> None:
    currencies = sorted(connection.account.balances) or ["USD"]
    for index in range(FLOOD_FRAMES):
        await connection.send(balance_frame(connection.account, currencies[:1]))
        if index % 100 == 99:
            await asyncio.sleep(0.1)


HUB_KEY = web.AppKey("sim_stream_hub", StreamHub)


def balance_frame(account: SimAccount, currencies: list[str]) -> str:
    now_ms = int(time.time() * 1000)
    return json.dumps({"e": "balanceUpdate", "E": now_ms, "u": now_ms, "B": [
        {"a": currency, "f": str(account.balances[currency].values["available"]),
         "c": str(account.balances[currency].values["amount"])}
        for currency in currencies if currency in account.balances]})


def _refused(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"result": "error", "reason": reason, "message": message},
                             status=status)


def _authenticated(request: web.Request) -> SimAccount | web.Response:
    """The account of a good upgrade, or the refusal Gemini answers."""
    state, hub = request.app[STATE_KEY], request.app[HUB_KEY]
    headers = request.headers
    if hub.reject_next:
        hub.reject_next = False
        return _refused(401, "InvalidSignature", "injected rejection")
    names = ("X-GEMINI-APIKEY", "X-GEMINI-NONCE", "X-GEMINI-PAYLOAD", "X-GEMINI-SIGNATURE")
    missing = [name for name in names if not headers.get(name)]
    if missing:
        return _refused(400, "MissingHeaders", f"headers missing: {', '.join(missing)}")
    key = state.keys.get(headers["X-GEMINI-APIKEY"])
    if key is None:
        return _refused(401, "InvalidApiKey", "unknown API key")
    payload = headers["X-GEMINI-PAYLOAD"].encode()
    if not signed_by(key, payload, headers["X-GEMINI-SIGNATURE"]):
        return _refused(401, "InvalidSignature", "signature does not match the payload")
    try:
        decoded = base64.b64decode(payload, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return _refused(400, "InvalidPayload", "payload is not base64")
    nonce = headers["X-GEMINI-NONCE"]
    if decoded != nonce or not nonce.isdigit():
        return _refused(400, "InvalidPayload", "the payload is not the nonce's text")
    if key.is_master:
        return _refused(401, "InvalidApiKey", "master keys cannot use the WebSocket API")
    if key.nonce != "seconds" or abs(int(nonce) - time.time()) > TIME_BASED_NONCE_WINDOW_SECONDS:
        return _refused(401, "InvalidNonce", "a time-based nonce within 30 s of now is needed")
    return state.accounts[key.accounts[0]]


def _answer(request_id: object, method: object, params: object,
            connection: StreamConnection) -> dict[str, Any]:
    channels = [channel for channel in params if isinstance(channel, str)] if isinstance(
        params, list) else []
    name = method.lower() if isinstance(method, str) else ""
    if name in ("subscribe", "unsubscribe") and channels and all(
            channel == CHANNEL for channel in channels):
        (connection.subscriptions.add if name == "subscribe"
         else connection.subscriptions.discard)(CHANNEL)
        return {"id": request_id, "status": 200, "result": None}
    if name == "list_subscriptions":
        return {"id": request_id, "status": 200, "result": sorted(connection.subscriptions)}
    if name == "ping":
        return {"id": request_id, "status": 200, "result": None}
    if name == "time":
        return {"id": request_id, "status": 200, "result": int(time.time() * 1000)}
    return {"id": request_id, "status": 400, "error": {"code": 400, "msg": "unknown request"}}


async def stream_handler(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB_KEY]
    account = _authenticated(request)
    if isinstance(account, web.Response):
        hub.rejected += 1
        return account
    socket = web.WebSocketResponse(autoping=False, max_msg_size=64 * 1024)
    await socket.prepare(request)
    hub.upgrades += 1
    connection = StreamConnection(socket, account)
    hub.connections.add(connection)
    try:
        async for message in socket:
            if connection.silent:
                continue
            if message.type == WSMsgType.PING:
                await socket.pong(message.data)
            elif message.type == WSMsgType.TEXT:
                try:
                    document = json.loads(message.data)
                except ValueError:
                    continue
                if isinstance(document, dict):
                    await connection.send(json.dumps(_answer(
                        document.get("id"), document.get("method"), document.get("params"),
                        connection)))
    finally:
        hub.connections.discard(connection)
    return socket


async def control_stream_fault(request: web.Request) -> web.Response:
    """A fault on the stream: `{"kind": drop | silent | garbage | huge | flood | reject_next}`;
    `size_bytes` for huge (2 MiB by default)."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    kind = body.get("kind") if isinstance(body, dict) else None
    size = body.get("size_bytes", HUGE_FRAME_BYTES) if isinstance(body, dict) else None
    if kind not in STREAM_FAULTS or not isinstance(size, int) or not 0 < size <= 2 * (
            HUGE_FRAME_BYTES):
        return web.json_response({"error": f"kind: expected one of {', '.join(STREAM_FAULTS)}; "
                                           "size_bytes (huge): up to 4 MiB"}, status=400)
    hub = request.app[HUB_KEY]
    await hub.fault(kind, size)
    return web.json_response({"connections": len(hub.connections)})


async def control_stream_state(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    return web.json_response({"connections": len(hub.connections), "upgrades": hub.upgrades,
                              "rejected": hub.rejected, "frames_sent": hub.frames_sent})


STREAM_ROUTES = (
    web.get("/", stream_handler),
    web.post("/_sim/stream/faults", control_stream_fault),
    web.get("/_sim/stream", control_stream_state),
)
