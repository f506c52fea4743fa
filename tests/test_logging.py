import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from balance_exporter.logging import REDACTED, configure_logging, redactor


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging points the root logger at this test's captured stderr, which closes
    with the test: put back what was there, so later tests do not log into a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def json_logging() -> None:
    # Called inside each test, once capsys has replaced stderr.
    configure_logging("debug", "json")
    redactor.set_secrets(["TOPSECRET-long-value", "TOPSECRET"])


def test_known_secret_values_are_blanked_anywhere_in_an_event(
    capsys: pytest.CaptureFixture[str],
) -> None:
    json_logging()
    structlog.get_logger("t").error("failed with TOPSECRET-long-value in it",
                                    detail=ValueError("TOPSECRET here"), count=3)
    line = json.loads(capsys.readouterr().err)
    assert line["event"] == f"failed with {REDACTED} in it"
    assert line["detail"] == f"{REDACTED} here"
    assert line["count"] == 3


def test_secret_named_fields_are_blanked(capsys: pytest.CaptureFixture[str]) -> None:
    json_logging()
    structlog.get_logger("t").info("x", api_secret="whatever", password="p", signature="s")
    line = json.loads(capsys.readouterr().err)
    assert line["api_secret"] == line["password"] == line["signature"] == REDACTED


def test_standard_library_loggers_share_the_format_and_redaction(
    capsys: pytest.CaptureFixture[str],
) -> None:
    json_logging()
    logging.getLogger("aiohttp.server").warning("bad request with TOPSECRET")
    line = json.loads(capsys.readouterr().err)
    assert line["logger"] == "aiohttp.server"
    assert line["level"] == "warning"
    assert line["event"] == f"bad request with {REDACTED}"
    assert "timestamp" in line


def test_level_filters(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warn", "console")
    structlog.get_logger("t").info("quiet")
    structlog.get_logger("t").warning("loud")
    err = capsys.readouterr().err
    assert "quiet" not in err
    assert "loud" in err


def test_a_secret_is_blanked_also_where_repr_escaped_it(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug", "json")
    secret = 'TOPSECRET\\with"quote'
    redactor.set_secrets([secret])
    structlog.get_logger("t").error("failed", detail=repr({"secret": secret}),
                                    error=ValueError(secret))
    line = capsys.readouterr().err
    assert "TOPSECRET" not in line
    assert REDACTED in line
