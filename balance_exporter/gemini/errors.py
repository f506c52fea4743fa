"""Typed failures of a Gemini request, each keeping Gemini's `reason`.

The scheduler reacts by class: a rate limit pauses the whole key, a transient failure backs off
one account, a rejected request (auth or configuration) will not fix itself and is retried
rarely, and a malformed reply is treated like a transient failure that keeps the old balances.
"""

import re

# Reasons that mean the request itself, the key or the configuration is wrong.
REJECTION_HINTS: dict[str, str] = {
    "InvalidSignature": "the API secret does not belong to this API key",
    "InvalidApiKey": "the API key is unknown to Gemini (sandbox and production keys differ)",
    "InvalidNonce": (
        "another process is using this API key, or the key is time-based: set `nonce: seconds`"
    ),
    "MissingNonce": "the request carried no nonce",
    "MissingRole": "the key lacks a role for this endpoint: give it the Auditor role",
    "MissingAccounts": "a master key needs `account` (the account's short name) in the config",
    "InvalidAccountName": "the key's group has no account of that name; check `account`",
    "MissingApikeyHeader": "the request carried no API key header",
    "MissingPayloadHeader": "the request carried no payload header",
    "MissingSignatureHeader": "the request carried no signature header",
    "InvalidJson": "Gemini could not read the payload",
    "EndpointMismatch": "the signed payload names another endpoint",
    "RemoteAddressForbidden": "this host's address is not allowed for the key (IP allow-list)",
    "ApiKeyIpFilteringFailure": "this host's address is not allowed for the key (IP allow-list)",
}
RATE_LIMIT_REASONS = frozenset({"RateLimit", "RateLimited", "Too Many Requests"})
TRANSIENT_REASONS = frozenset({"Maintenance", "System"})

_REASON_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
_REASON_MAX_LEN = 48


def normalize_reason(reason: str) -> str:
    """A short, label-safe form of a reason: it becomes a label value, so it must stay small."""
    compact = _REASON_UNSAFE.sub("", reason.title() if " " in reason else reason)
    return compact[:_REASON_MAX_LEN] or "Unknown"


class GeminiError(Exception):
    """A request to Gemini that gave no usable reply."""

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = normalize_reason(reason)
        self.message = message
        self.status = status


class RequestRejected(GeminiError):
    """Auth or configuration errors: retrying soon will not help."""

    @property
    def hint(self) -> str:
        return REJECTION_HINTS.get(self.reason, "check the key, its roles and the account name")


class RateLimited(GeminiError):
    def __init__(self, reason: str, message: str, status: int | None, retry_after: float | None):
        super().__init__(reason, message, status)
        self.retry_after = retry_after


class TransientError(GeminiError):
    """Server trouble, timeouts and connection failures: worth retrying with backoff."""


class MalformedReply(GeminiError):
    """A reply that cannot be trusted: not JSON, an HTML page, or the wrong shape."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__("MalformedReply", message, status)


def classify_error(status: int, reason: str | None, message: str, retry_after: float | None) -> (
    GeminiError
):
    """The typed error for a non-success reply, from its status and Gemini's reason if any."""
    if status == 429 or (reason is not None and reason in RATE_LIMIT_REASONS):
        return RateLimited(reason or "RateLimit", message, status, retry_after)
    if reason in TRANSIENT_REASONS or status >= 500:
        return TransientError(reason or f"HTTP{status}", message, status)
    if reason is not None:
        return RequestRejected(reason, message, status)
    if 400 <= status < 500:
        return RequestRejected(f"HTTP{status}", message, status)
    return MalformedReply(f"unexpected HTTP status {status}: {message}", status)
