"""The WebSocket stream's pieces that need no socket: the upgrade's signature (against vectors
computed with `openssl dgst -sha384 -hmac`), and the strict reading of its messages."""

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from balance_exporter.gemini.errors import MalformedReply
from balance_exporter.gemini.replies import (
    MAX_STREAM_ASSETS,
    BalanceUpdate,
    StreamAnswer,
    parse_stream_message,
)
from balance_exporter.gemini.signing import stream_headers

# printf '%s' "$payload" | openssl dgst -sha384 -hmac 'TOPSECRET-stream-1'
VECTORS = [
    (1733356800, "MTczMzM1NjgwMA==",
     "13b4f1ffed364ebb1fe45d20563885fac81e10e8793c99509a5cfff2dd2b38a4"
     "88558ed3ca2cc71731a3ffd77286e99a"),
    (1800000000, "MTgwMDAwMDAwMA==",
     "2d7da961d003fc1e3cd677e2c2cb6a26d4145280bac66b6db3f13e63ce85dcdc"
     "1f92259c810f5fa7ad89973aff460148"),
]


@pytest.mark.parametrize(("nonce", "payload", "signature"), VECTORS)
def test_the_upgrade_is_signed_as_openssl_signs_it(nonce: int, payload: str,
                                                   signature: str) -> None:
    assert stream_headers("account-hot", SecretStr("TOPSECRET-stream-1"), nonce) == {
        "X-GEMINI-APIKEY": "account-hot", "X-GEMINI-NONCE": str(nonce),
        "X-GEMINI-PAYLOAD": payload, "X-GEMINI-SIGNATURE": signature}


def frame(**fields: object) -> str:
    return json.dumps({"e": "balanceUpdate", "E": 1_759_000_000_000, "u": 1_759_000_000_000,
                       "B": [{"a": "USD", "f": "100.00", "c": "100.00"}], **fields})


@pytest.mark.parametrize(("u", "ns"), [
    (1_759_000_000_123, 1_759_000_000_123_000_000),  # milliseconds, as Gemini's example
    (10**14 - 1, (10**14 - 1) * 10**6),  # the largest milliseconds
    (10**17, 10**17),  # the smallest nanoseconds
    ("1759000000123456789", 1_759_000_000_123_456_789),
])
def test_u_is_read_as_milliseconds_or_nanoseconds(u: object, ns: int) -> None:
    assert parse_stream_message(frame(u=u)) == BalanceUpdate(ns, ("USD",))


@pytest.mark.parametrize("bad", [
    {"u": 10**14}, {"u": 10**17 - 1}, {"u": None}, {"u": -5}, {"u": 1.5},
    {"B": {"a": "USD"}}, {"B": [{"a": "U S D", "f": "1", "c": "1"}]},
    {"B": [{"a": "USD", "f": "lots", "c": "1"}]}, {"B": [{"a": "USD", "f": "1"}]},
    {"B": [{"a": "USD", "f": "1", "c": "1"}] * (MAX_STREAM_ASSETS + 1)},
], ids=["u between the units (low)", "u between the units (high)", "no u", "negative u",
        "fractional u", "B an object", "a bad asset code", "f not a number", "no c",
        "too many assets"])
def test_a_malformed_frame_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(MalformedReply):
        parse_stream_message(frame(**bad))


def test_at_most_so_many_assets_and_numbers_in_either_form() -> None:
    assets = [{"a": f"C{i}", "f": 1, "c": "2.5"} for i in range(MAX_STREAM_ASSETS)]
    update = parse_stream_message(frame(B=assets))
    assert isinstance(update, BalanceUpdate)
    assert len(update.currencies) == MAX_STREAM_ASSETS


def test_answers_are_told_apart_and_anything_else_is_ignored() -> None:
    assert parse_stream_message('{"id": 1, "status": 200, "result": null}') == StreamAnswer(1, 200)
    assert parse_stream_message('{"id": 1, "status": 401, "error": {"code": 401}}') == (
        StreamAnswer(1, 401))
    assert parse_stream_message('{"e": "heartbeat"}') is None
    for not_an_object in ("[]", "5", "not json"):
        with pytest.raises(MalformedReply):
            parse_stream_message(not_an_object)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=4), children, max_size=4), max_leaves=20)
frame_fields = st.dictionaries(st.sampled_from(["e", "E", "u", "B", "id", "status"]),
                               json_values | st.just("balanceUpdate"), max_size=6)


@given(st.binary(max_size=200) | frame_fields.map(json.dumps))
def test_any_message_is_read_or_refused_never_crashes(message: bytes | str) -> None:
    with contextlib.suppress(MalformedReply):
        parse_stream_message(message)
