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
# Statuses that send a request elsewhere; the client never follows them.
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RATE_LIMIT_REASONS = frozenset({"RateLimit", "RateLimited", "Too Many Requests"})
TRANSIENT_REASONS = frozenset({"Maintenance", "System"})

# What this side names a failure when Gemini gave no reason (or no reply).
LOCAL_REASONS = frozenset({
    "Timeout", "ConnectionError", "MalformedReply", "FutureTimestamp", "ReplyTooLarge",
    "Redirect", "InternalError",
})
# A reason outside the known ones is still logged in full; as a label value it is this one, so
# that a server inventing reasons cannot grow the series without bound.
OTHER_REASON = "Other"

_REASON_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
_REASON_MAX_LEN = 48
# Upstream text in logs and errors: enough to diagnose, never megabytes.
MAX_MESSAGE_CHARACTERS = 300
_HTTP_REASON = re.compile(r"HTTP[1-5][0-9][0-9]")


def normalize_reason(reason: str) -> str:
    """A short, label-safe form of a reason, as it is logged."""
    compact = _REASON_UNSAFE.sub("", reason.title() if " " in reason else reason)
    return compact[:_REASON_MAX_LEN] or "Unknown"


KNOWN_REASONS = frozenset({
    *REJECTION_HINTS, *TRANSIENT_REASONS, *LOCAL_REASONS,
    *(normalize_reason(reason) for reason in RATE_LIMIT_REASONS),
})


def truncated(text: str, limit: int = MAX_MESSAGE_CHARACTERS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class GeminiError(Exception):
    """A request to Gemini that gave no usable reply.

    `reason` is a bounded label value (the known reasons, `HTTP<status>`, or `Other`);
    `gemini_reason` is what the reply said, cleaned and shortened, for the log."""

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        message = truncated(message)
        super().__init__(f"{reason}: {message}" if message else reason)
        self.gemini_reason = normalize_reason(reason)
        self.reason = (self.gemini_reason if self.gemini_reason in KNOWN_REASONS
                       or _HTTP_REASON.fullmatch(self.gemini_reason) else OTHER_REASON)
        self.message = message
        self.status = status


class RequestRejected(GeminiError):
    """Auth or configuration errors: retrying soon will not help."""

    @property
    def hint(self) -> str:
        if self.reason == "Redirect":
            return ("private endpoints are never followed to another address: check base_url "
                    "(and any proxy in front of Gemini)")
        return REJECTION_HINTS.get(self.reason, "check the key, its roles and the account name")


class RateLimited(GeminiError):
    def __init__(self, reason: str, message: str, status: int | None, retry_after: float | None):
        super().__init__(reason, message, status)
        self.retry_after = retry_after


class TransientError(GeminiError):
    """Server trouble, timeouts and connection failures: worth retrying with backoff."""


class MalformedReply(GeminiError):
    """A reply that cannot be trusted: not JSON, an HTML page, the wrong shape, too large, or
    stamped in the future; `reason` says which (one of LOCAL_REASONS)."""

    def __init__(
        self, message: str, status: int | None = None, reason: str = "MalformedReply"
    ) -> None:
        super().__init__(reason, message, status)


def classify_error(status: int, reason: str | None, message: str, retry_after: float | None) -> (
    GeminiError
):
    """The typed error for a non-success reply, from its status and Gemini's reason if any."""
    if status == 429 or (reason is not None and reason in RATE_LIMIT_REASONS):
        return RateLimited(reason or "RateLimit", message, status, retry_after)
    if reason in TRANSIENT_REASONS or status >= 500:
        return TransientError(reason or f"HTTP{status}", message, status)
    if status in REDIRECT_STATUSES:
        return RequestRejected("Redirect", message, status)
    if reason is not None:
        return RequestRejected(reason, message, status)
    if 400 <= status < 500:
        return RequestRejected(f"HTTP{status}", message, status)
    return MalformedReply(f"unexpected HTTP status {status}: {message}", status)
