"""One log format for every logger: structlog renders ours and the standard library's alike.

Secrets are redacted twice: nothing logs them on purpose, and the redactor rewrites any
configured secret value (and any field named like a secret) should one slip into an event.
"""

import json
import logging
import sys
from collections.abc import Iterable
from typing import Literal

import structlog
from structlog.typing import EventDict, Processor

LogFormat = Literal["json", "console"]
LOG_LEVELS = ("debug", "info", "warn", "error")
REDACTED = "[REDACTED]"
_SECRET_FIELD_WORDS = ("secret", "password", "signature", "authorization", "payload")


class SecretRedactor:
    """A structlog processor that blanks known secret values and secret-named fields."""

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()

    def set_secrets(self, secrets: Iterable[str]) -> None:
        # Each secret also as repr() and JSON write it (a backslash or quote doubled), since it
        # may reach an event inside the repr of something else. Longest first, so a secret that
        # contains another is blanked whole.
        forms = {form for secret in secrets if secret
                 for form in (secret, repr(secret)[1:-1], json.dumps(secret)[1:-1])}
        self._secrets = tuple(sorted(forms, key=len, reverse=True))

    def _scrub(self, value: str) -> str:
        for secret in self._secrets:
            value = value.replace(secret, REDACTED)
        return value

    def __call__(self, logger: object, method: str, event: EventDict) -> EventDict:
        for name, value in event.items():
            if any(word in name.lower() for word in _SECRET_FIELD_WORDS):
                event[name] = REDACTED
            elif isinstance(value, str):
                event[name] = self._scrub(value)
            elif value is not None and not isinstance(value, int | float | bool):
                event[name] = self._scrub(str(value))
        return event


redactor = SecretRedactor()


def _level_number(level: str) -> int:
    return logging.WARNING if level == "warn" else logging.getLevelNamesMapping()[level.upper()]


def configure_logging(level: str = "info", log_format: LogFormat = "json") -> None:
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redactor,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_level_number(level))

