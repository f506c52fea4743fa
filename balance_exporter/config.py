"""Configuration: the YAML file (or, for containers, environment variables) to validated settings.

Loading is all or nothing: every problem is collected and reported with the path of the field
it concerns (`accounts[1].key: no key named 'ops'`), and no message ever carries a secret value.
Secret files and variables are read here, at start and again on SIGHUP.
"""

import hashlib
import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from balance_exporter.precision import Precision

GEMINI_RATE_LIMIT_PER_SECOND = 10.0  # 600 requests per minute
GEMINI_RECOMMENDED_PER_SECOND = 5.0
DEFAULT_PRECISION_PLACES = 8
# Fiat is kept in cents; crypto at its smallest on-chain unit where Gemini lists it so.
DEFAULT_PRECISION: dict[str, int] = {
    **dict.fromkeys(["USD", "EUR", "GBP", "SGD", "CAD", "AUD", "HKD", "CHF", "NZD"], 2),
    "BTC": 8, "BCH": 8, "LTC": 8, "ZEC": 8, "DOGE": 8,
    "ETH": 18,
}
ENV_PREFIX = "BALANCE_EXPORTER_"
# Every duration in the config is finite and at most a day: longer waits hide outages.
MAX_DURATION_SECONDS = 86400.0
# Gemini's secrets are about 28 characters; a short one would also make the log redactor blank
# every occurrence of a common string.
MIN_SECRET_LENGTH = 10
MAX_CREDENTIAL_LENGTH = 256
MAX_REPLY_BYTES_LIMIT = 64 * 1024 * 1024

NonceUnit = Literal["milliseconds", "seconds"]
LabelText = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@/-]+$")]


class ConfigError(Exception):
    """A configuration that cannot be used; `problems` are `path: message` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


Duration = Annotated[float, Field(ge=0, le=MAX_DURATION_SECONDS)]
Interval = Annotated[float, Field(ge=1, le=MAX_DURATION_SECONDS)]
# /v2/transfers: Gemini allows one request per 5 s per account; the first poll looks back at most
# 30 days for pending transfers.
MIN_TRANSFERS_INTERVAL_SECONDS = 5.0
MAX_TRANSFERS_LOOKBACK_SECONDS = 30 * 86400.0
# A shell-style pattern on account short names (`*`, `?`, `[...]`).
AccountPattern = Annotated[str, Field(min_length=1, max_length=128)]
MAX_DISCOVERY_PATTERNS = 64
# Pages of a group's listing (500 accounts each) read at most: by default 10,000 accounts, and
# 100,000 at the most one may set.
DEFAULT_LISTING_PAGES = 20
MAX_LISTING_PAGES = 200
# Withdrawal allow-lists (/v1/approvedAddresses/account/{network}): every (account, network) is
# a request stream of its own, so the networks are few, and by default lists are read every few
# minutes.
MAX_ALLOW_LIST_NETWORKS = 32
MIN_ALLOW_LIST_INTERVAL_SECONDS = 60.0


def _off_or_interval(value: float | None) -> float | None:
    if value is not None and 0 < value < 1:
        raise ValueError("must be 0 (off) or at least 1 second")
    return value


def _off_or_transfers_interval(value: float | None) -> float | None:
    if value is not None and 0 < value < MIN_TRANSFERS_INTERVAL_SECONDS:
        raise ValueError(f"must be 0 (off) or at least {MIN_TRANSFERS_INTERVAL_SECONDS:g} "
                         "seconds (Gemini allows one transfers request per 5 s per account)")
    return value


# What a currency code in a reply may be (`gemini.replies`), so that a configured one can match.
_CURRENCY_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}", re.ASCII)


def _by_currency(values: dict[str, Any]) -> dict[str, Any]:
    """A mapping keyed by currency, its keys checked and folded to upper case as Gemini sends
    them (a `usd:` threshold would otherwise never meet Gemini's USD rows)."""
    folded: dict[str, Any] = {}
    for currency, value in values.items():
        if not _CURRENCY_CODE.fullmatch(currency):
            raise ValueError(f"{currency[:20]!r} is not a currency code (1 to 16 ASCII letters, "
                             "digits or ._-, starting with a letter or digit)")
        if currency.upper() in folded:
            raise ValueError(f"{currency!r} is given twice (currency codes ignore case)")
        folded[currency.upper()] = value
    return folded


# 0 turns the poll off; otherwise an interval like `interval_seconds`.
OffOrInterval = Annotated[float, Field(ge=0, le=MAX_DURATION_SECONDS)]


class _Strict(BaseModel):
    # NaN and infinities are never a setting: `.inf` would make a backoff or interval endless.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class GeminiSettings(_Strict):
    # Plain http sends the key and a replayable signature in the clear: loopback only, unless
    # this says otherwise (a TLS-terminating sidecar, say). Before base_url, which it checks.
    allow_insecure_http: bool = False
    base_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$")] = (
        "https://api.gemini.com"
    )
    timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    # An optional budget shared by all keys, for when Gemini counts per IP address.
    requests_per_second: Annotated[float, Field(gt=0)] | None = None
    # A reply stamped further ahead of this host's clock is malformed (0: no check); otherwise
    # one reply from a server with a wrong clock would make every correct reply after it stale.
    max_timestamp_skew_seconds: Duration = 300.0
    # A real reply is kilobytes; a larger one is malformed, and reading stops at the cap.
    max_reply_bytes: Annotated[int, Field(ge=1024, le=MAX_REPLY_BYTES_LIMIT)] = 4 * 1024 * 1024
    # An egress proxy (keys are often allow-listed to its address); HTTPS_PROXY and NO_PROXY
    # are honoured without it.
    proxy_url: Annotated[str, Field(pattern=r"^https?://[^\s/]+/?$")] | None = None
    # Extra CA certificates to trust for base_url (a private CA, a TLS-inspecting proxy).
    ca_file: Path | None = None
    # Gemini's WebSocket API, for keys that stream (sandbox: wss://ws.sandbox.gemini.com).
    websocket_url: Annotated[str, Field(pattern=r"^wss?://[^\s/]+(/[^\s]*)?$")] = (
        "wss://ws.gemini.com")

    @field_validator("base_url", "websocket_url", mode="after")
    @classmethod
    def _check_base_url(cls, url: str, info: ValidationInfo) -> str:
        scheme, _, rest = url.partition("://")
        authority = rest.split("/", 1)[0]
        if "@" in authority:
            raise ValueError("must not carry a user or password (they would go with every "
                             "request and into logs)")
        host = authority.rsplit(":", 1)[0] if not authority.endswith("]") else authority
        if scheme in ("http", "ws") and not info.data.get("allow_insecure_http") and not (
                _is_loopback(host)):
            raise ValueError(f"plain {scheme}:// is only for a loopback host; use {scheme}s:// "
                             "or set gemini.allow_insecure_http: true")
        return url


class AccountOptions(_Strict):
    """What is polled for an account and how often: an `accounts:` entry but its key, account
    and name, which is also what `discover.defaults` gives every discovered account."""

    show_pending_balances: bool = False
    interval_seconds: Interval = 30.0
    # None: `notional.interval_seconds` when `notional:` is set; 0: no notional polls.
    notional_interval_seconds: OffOrInterval | None = None
    # None or 0: no staking polls.
    staking_interval_seconds: OffOrInterval | None = None
    # Alert thresholds, exported as metrics so that alert rules need no editing.
    min_available: dict[Annotated[str, Field(min_length=1)], float] = {}
    max_available_drop_ratio: Annotated[float, Field(gt=0, le=1)] | None = None
    # In the quote currency (`notional.currency`): the least the account's available value
    # may be.
    min_available_notional: Annotated[float, Field(ge=0)] | None = None
    # None: `approved_addresses.interval_seconds` when `approved_addresses:` is set; 0: off.
    # Below that section's least (60 s) only when an account asks for it.
    approved_addresses_interval_seconds: OffOrInterval | None = None
    # None: `transfers.interval_seconds` when `transfers:` is set; 0: off.
    transfers_interval_seconds: OffOrInterval | None = None
    # Alert thresholds of the transfers, exported as metrics.
    max_withdrawal_pending_seconds: Annotated[
        float, Field(gt=0, le=MAX_TRANSFERS_LOOKBACK_SECONDS)] | None = None
    max_withdrawn_per_hour: dict[Annotated[str, Field(min_length=1)],
                                 Annotated[float, Field(ge=0)]] = {}

    _check_off_or_interval = field_validator(
        "notional_interval_seconds", "staking_interval_seconds",
        "approved_addresses_interval_seconds")(_off_or_interval)
    _check_transfers_interval = field_validator(
        "transfers_interval_seconds")(_off_or_transfers_interval)
    _check_currencies = field_validator("min_available", "max_withdrawn_per_hour")(_by_currency)

    def over(self, defaults: "AccountOptions") -> "AccountOptions":
        """These options where they were set, `defaults` where they were not."""
        own = {name: getattr(self, name) for name in self.model_fields_set
               if name in AccountOptions.model_fields}
        return AccountOptions.model_validate({**defaults.model_dump(), **own})


class DiscoverSettings(_Strict):
    """A master key's accounts, polled from Gemini's /v1/account/list instead of listed here."""

    include: Annotated[list[AccountPattern], Field(min_length=1,
                                                   max_length=MAX_DISCOVERY_PATTERNS)] = ["*"]
    exclude: Annotated[list[AccountPattern], Field(max_length=MAX_DISCOVERY_PATTERNS)] = []
    refresh_seconds: Interval = 900.0
    # A listing longer than this many pages counts as cut short.
    max_pages: Annotated[int, Field(ge=1, le=MAX_LISTING_PAGES, strict=True)] = (
        DEFAULT_LISTING_PAGES)
    defaults: AccountOptions = AccountOptions()


class NotionalSettings(_Strict):
    """Every account's value in one quote currency, from /v1/notionalbalances/{currency}."""

    currency: Annotated[str, Field(pattern=r"^[A-Za-z]{3,5}$")]
    interval_seconds: Interval = 300.0

    @field_validator("currency", mode="after")
    @classmethod
    def _upper(cls, currency: str) -> str:
        return currency.upper()


class TransfersSettings(_Strict):
    """Every account's deposits and withdrawals, from /v2/transfers."""

    interval_seconds: Annotated[float, Field(ge=MIN_TRANSFERS_INTERVAL_SECONDS,
                                             le=MAX_DURATION_SECONDS)] = 60.0
    # How far back the first poll after a start without saved state looks for pending ones.
    lookback_seconds: Annotated[float, Field(ge=0, le=MAX_TRANSFERS_LOOKBACK_SECONDS)] = (
        7 * 86400.0)


# Gemini's network names in the allow-list path are lower-case words (bitcoin, ethereum, xrpl).
NetworkName = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9]+$")]


class ApprovedAddressesSettings(_Strict):
    """Which networks' withdrawal allow-lists every account's are read for, and how often."""

    networks: Annotated[list[NetworkName], Field(min_length=1,
                                                 max_length=MAX_ALLOW_LIST_NETWORKS)]
    interval_seconds: Annotated[float, Field(ge=MIN_ALLOW_LIST_INTERVAL_SECONDS,
                                             le=MAX_DURATION_SECONDS)] = 900.0

    @field_validator("networks", mode="after")
    @classmethod
    def _once_each(cls, networks: list[str]) -> list[str]:
        twice = sorted({network for network in networks if networks.count(network) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} given more than once")
        return networks


class StreamSettings(_Strict):
    """A key's balances@account stream: it says when an account's balances changed, and the
    account's balances poll comes as soon as the key's budget allows."""

    enabled: bool = True
    # While the stream is up, the account's regular balances polls come this often at most.
    reconcile_interval_seconds: Annotated[float, Field(ge=10, le=MAX_DURATION_SECONDS)] = 300.0


class KeySettings(_Strict):
    name: LabelText
    api_key: Annotated[str, Field(min_length=1)] | None = None
    api_key_file: Path | None = None
    api_secret: SecretStr | None = None
    api_secret_file: Path | None = None
    api_secret_env: Annotated[str, Field(min_length=1)] | None = None
    nonce: NonceUnit = "milliseconds"
    requests_per_second: Annotated[float, Field(gt=0)] = 2.0
    discover: DiscoverSettings | None = None
    stream: StreamSettings | None = None

    @property
    def streams(self) -> bool:
        return self.stream is not None and self.stream.enabled


class AccountSettings(AccountOptions):
    key: str
    # Gemini's short name for the account; None for an account-scoped key.
    account: Annotated[str, Field(min_length=1)] | None = None
    # The `account` label value; defaults to `account`, then to the key's name.
    name: LabelText | None = None

    @property
    def label(self) -> str:
        return self.name or self.account or self.key


class PollingSettings(_Strict):
    # Auth and configuration errors will not fix themselves: retry rarely.
    rejected_retry_seconds: Annotated[float, Field(ge=1, le=MAX_DURATION_SECONDS)] = 300.0
    max_backoff_seconds: Annotated[float, Field(ge=1, le=MAX_DURATION_SECONDS)] = 300.0
    # How often each key asks for its roles (besides at start and after each reload).
    roles_refresh_seconds: Annotated[float, Field(ge=60, le=MAX_DURATION_SECONDS)] = 3600.0


class ExporterSettings(_Strict):
    gemini: GeminiSettings = GeminiSettings()
    keys: Annotated[list[KeySettings], Field(min_length=1)]
    # May be empty when a key discovers its accounts.
    accounts: list[AccountSettings] = []
    notional: NotionalSettings | None = None
    approved_addresses: ApprovedAddressesSettings | None = None
    transfers: TransfersSettings | None = None
    precision: dict[str, Annotated[int, Field(ge=0, le=30)]] = {}
    default_precision: Annotated[int, Field(ge=0, le=30)] = DEFAULT_PRECISION_PLACES
    polling: PollingSettings = PollingSettings()

    _check_currencies = field_validator("precision")(_by_currency)

    # ConfigError is no ValueError, so pydantic lets it through with its own paths intact.
    @model_validator(mode="after")
    def _check_references(self) -> "ExporterSettings":
        problems = [*_key_problems(self.keys), *_account_problems(self),
                    *_notional_problems(self), *_allow_list_problems(self),
                    *_transfers_problems(self)]
        if problems:
            raise ConfigError(problems)
        return self


def credential_problem(text: str, secret: bool) -> str | None:
    """Why an API key or secret cannot be right, without quoting it; None if it can be."""
    what = "the secret" if secret else "the API key"
    if not text.isascii() or not text.isprintable() or any(c.isspace() for c in text):
        return f"{what} must be printable ASCII without spaces"
    if secret and len(text) < MIN_SECRET_LENGTH:
        return f"{what} is shorter than {MIN_SECRET_LENGTH} characters"
    if len(text) > MAX_CREDENTIAL_LENGTH:
        return f"{what} is longer than {MAX_CREDENTIAL_LENGTH} characters"
    return None


def _key_problems(keys: list[KeySettings]) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for index, key in enumerate(keys):
        where = f"keys[{index}]"
        if key.name in seen:
            problems.append(f"{where}.name: another key is already named {key.name!r}")
        seen.add(key.name)
        if (key.api_key is None) == (key.api_key_file is None):
            problems.append(f"{where}: set exactly one of api_key, api_key_file")
        secret_sources = [key.api_secret, key.api_secret_file, key.api_secret_env]
        if sum(source is not None for source in secret_sources) != 1:
            problems.append(
                f"{where}: set exactly one of api_secret_file, api_secret_env, api_secret"
            )
        if key.streams and key.nonce != "seconds":
            problems.append(f"{where}.stream: Gemini's WebSocket API takes only keys with "
                            f"time-based nonces; set `nonce: seconds` on key {key.name!r} (and "
                            "create the key in Gemini with time-based nonces)")
        limit = 1.0 if key.nonce == "seconds" else GEMINI_RATE_LIMIT_PER_SECOND
        if key.requests_per_second > limit:
            why = (
                "a key with `nonce: seconds` needs a new whole second for every request"
                if key.nonce == "seconds"
                else "Gemini allows 600 requests per minute"
            )
            problems.append(
                f"{where}.requests_per_second: {key.requests_per_second:g} is above {limit:g}; "
                + why
            )
    return problems


def _account_problems(settings: ExporterSettings) -> list[str]:
    problems: list[str] = []
    key_names = {key.name for key in settings.keys}
    labels: set[str] = set()
    targets: set[tuple[str, str | None]] = set()
    for index, account in enumerate(settings.accounts):
        where = f"accounts[{index}]"
        if account.key not in key_names:
            problems.append(f"{where}.key: no key named {account.key!r}")
        if account.label in labels:
            problems.append(f"{where}.name: another account is already named {account.label!r}")
        labels.add(account.label)
        target = (account.key, account.account)
        if target in targets:
            problems.append(f"{where}: key {account.key!r} already polls this account")
        targets.add(target)
    if not settings.accounts and not any(key.discover for key in settings.keys):
        problems.append("accounts: nothing to poll: list accounts, or give a master key "
                        "`discover:`")
    return problems


def _account_options(settings: ExporterSettings) -> list[tuple[str, AccountOptions]]:
    """Every set of account options with where it is: the accounts and the discover defaults."""
    entries: list[tuple[str, AccountOptions]] = [
        (f"accounts[{index}]", account) for index, account in enumerate(settings.accounts)]
    return entries + [(f"keys[{index}].discover.defaults", key.discover.defaults)
                      for index, key in enumerate(settings.keys) if key.discover is not None]


def _notional_problems(settings: ExporterSettings) -> list[str]:
    """Notional polls and thresholds need the quote currency, which only `notional:` gives."""
    if settings.notional is not None:
        return []
    problems = []
    for where, options in _account_options(settings):
        if options.notional_interval_seconds:
            problems.append(f"{where}.notional_interval_seconds: needs a top-level `notional:` "
                            "with the quote currency")
        if options.min_available_notional is not None:
            problems.append(f"{where}.min_available_notional: needs a top-level `notional:` "
                            "with the quote currency")
    return problems


def _allow_list_problems(settings: ExporterSettings) -> list[str]:
    """An account's allow-list interval needs the networks, which only `approved_addresses:`
    gives."""
    if settings.approved_addresses is not None:
        return []
    return [f"{where}.approved_addresses_interval_seconds: needs a top-level "
            "`approved_addresses:` with the networks"
            for where, options in _account_options(settings)
            if options.approved_addresses_interval_seconds]


def _transfers_problems(settings: ExporterSettings) -> list[str]:
    """Transfer intervals and thresholds mean nothing without `transfers:`, which turns the
    reading on."""
    if settings.transfers is not None:
        return []
    problems = []
    for where, options in _account_options(settings):
        for name, value in (("transfers_interval_seconds", options.transfers_interval_seconds),
                            ("max_withdrawal_pending_seconds",
                             options.max_withdrawal_pending_seconds),
                            ("max_withdrawn_per_hour", options.max_withdrawn_per_hour)):
            if value:
                problems.append(f"{where}.{name}: needs a top-level `transfers:`")
    return problems


def config_warnings(settings: ExporterSettings) -> list[str]:
    return [
        f"keys[{index}].requests_per_second: {key.requests_per_second:g} is above Gemini's "
        f"recommended {GEMINI_RECOMMENDED_PER_SECOND:g} per second"
        for index, key in enumerate(settings.keys)
        if key.requests_per_second > GEMINI_RECOMMENDED_PER_SECOND
    ]


@dataclass(frozen=True)
class Credentials:
    """One key's API key and secret, read from wherever the config points; what signs requests."""

    api_key: str
    api_secret: SecretStr = field(repr=False)

    @property
    def is_master(self) -> bool:
        return self.api_key.startswith("master-")

    @property
    def key_id(self) -> str:
        """The API key's identity, whatever its entry is named: a fingerprint, not the key (the
        state file keeps it)."""
        return hashlib.sha256(self.api_key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Config:
    settings: ExporterSettings
    # Per key name, in the order of `keys:`.
    credentials: dict[str, Credentials]
    warnings: tuple[str, ...]
    # What to trust for Gemini's certificate when `gemini.ca_file` adds CAs; None: the system's.
    gemini_tls: ssl.SSLContext | None = field(default=None, repr=False)

    @property
    def precision(self) -> Precision:
        return Precision({**DEFAULT_PRECISION, **self.settings.precision},
                         self.settings.default_precision)

    @property
    def secrets(self) -> list[str]:
        secrets = [key.api_secret.get_secret_value() for key in self.credentials.values()]
        proxy_password = urlsplit(self.settings.gemini.proxy_url or "").password
        return [*secrets, proxy_password] if proxy_password else secrets


def _read_text_file(path: Path, where: str, problems: list[str]) -> str | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        problems.append(f"{where}: cannot read {str(path)!r}: {reason}")
        return None
    if not text:
        problems.append(f"{where}: {str(path)!r} is empty")
        return None
    return text


def _resolve_key(
    index: int,
    key: KeySettings,
    environ: Mapping[str, str],
    base_dir: Path,
    problems: list[str],
) -> Credentials | None:
    where = f"keys[{index}]"
    api_key = key.api_key
    if key.api_key_file is not None:
        api_key = _read_text_file(base_dir / key.api_key_file, f"{where}.api_key_file", problems)
    secret: str | None = None
    if key.api_secret is not None:
        secret = key.api_secret.get_secret_value()
    elif key.api_secret_file is not None:
        secret = _read_text_file(
            base_dir / key.api_secret_file, f"{where}.api_secret_file", problems
        )
    elif key.api_secret_env is not None:
        secret = environ.get(key.api_secret_env) or None
        if secret is None:
            problems.append(f"{where}.api_secret_env: variable {key.api_secret_env} is not set")
    for text, field_name, is_secret in ((api_key, "api_key", False), (secret, "api_secret", True)):
        problem = credential_problem(text, is_secret) if text is not None else None
        if problem is not None:
            problems.append(f"{where}.{field_name}: {problem}")
            return None
    if api_key is None or secret is None:
        return None
    return Credentials(api_key=api_key, api_secret=SecretStr(secret))


def _shared_key_problems(settings: ExporterSettings, keys: dict[str, Credentials]) -> list[str]:
    """One API key under two names would run two workers on it: racing nonces, twice the rate."""
    problems = []
    first_entry: dict[str, int] = {}
    for index, key in enumerate(settings.keys):
        if key.name not in keys:
            continue
        api_key = keys[key.name].api_key
        if api_key in first_entry:
            other = first_entry[api_key]
            problems.append(
                f"keys[{index}] ({key.name!r}): the same API key as keys[{other}] "
                f"({settings.keys[other].name!r}); give each API key one entry")
        else:
            first_entry[api_key] = index
    return problems


def _master_key_problems(settings: ExporterSettings, keys: dict[str, Credentials]) -> list[str]:
    discovering = [
        f"keys[{index}].discover: key {key.name!r} is account-scoped; only a master key can "
        "list a group's accounts (/v1/account/list)"
        for index, key in enumerate(settings.keys)
        if key.discover is not None and key.name in keys and not keys[key.name].is_master
    ]
    streaming = [
        f"keys[{index}].stream: key {key.name!r} is a master key; Gemini's WebSocket API "
        "answers master keys 401 (stream with an account-scoped key)"
        for index, key in enumerate(settings.keys)
        if key.streams and key.name in keys and keys[key.name].is_master
    ]
    return discovering + streaming + [
        f"accounts[{index}].account: key {account.key!r} is a master key, which needs the "
        "account's short name (Gemini answers MissingAccounts without it)"
        for index, account in enumerate(settings.accounts)
        if account.account is None and account.key in keys and keys[account.key].is_master
    ]


def _format_location(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def validation_problems(
    error: ValidationError,
    name_location: Callable[[tuple[int | str, ...]], str] = _format_location,
) -> list[str]:
    return [
        f"{name_location(tuple(detail['loc']))}: {detail['msg']}"
        for detail in error.errors(include_input=False, include_url=False)
    ]


def build_config(
    document: object, environ: Mapping[str, str], base_dir: Path | None = None
) -> Config:
    """Validate a config document; relative file paths in it are taken from `base_dir`."""
    if not isinstance(document, dict):
        raise ConfigError([f"(top level): expected a mapping, got {type(document).__name__}"])
    try:
        settings = ExporterSettings.model_validate(document)
    except ValidationError as error:
        raise ConfigError(validation_problems(error)) from None
    problems: list[str] = []
    keys = {
        key.name: resolved
        for index, key in enumerate(settings.keys)
        if (resolved := _resolve_key(index, key, environ, base_dir or Path(), problems))
        is not None
    }
    problems += _shared_key_problems(settings, keys)
    problems += _master_key_problems(settings, keys)
    tls = _gemini_tls(settings.gemini.ca_file, base_dir or Path(), problems)
    if problems:
        raise ConfigError(problems)
    return Config(settings=settings, credentials=keys, warnings=tuple(config_warnings(settings)),
                  gemini_tls=tls)


def _gemini_tls(ca_file: Path | None, base_dir: Path, problems: list[str]) -> ssl.SSLContext | None:
    if ca_file is None:
        return None
    context = ssl.create_default_context()
    try:
        context.load_verify_locations(cafile=base_dir / ca_file)
    except (OSError, ssl.SSLError, ValueError) as error:
        reason = getattr(error, "strerror", None) or "not PEM certificates"
        problems.append(f"gemini.ca_file: cannot load {str(ca_file)!r}: {reason}")
        return None
    return context


def read_config_file(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError([f"{path}: cannot read: {reason}"]) from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        # PyYAML's problem text quotes the source (an alias name, a character), and a secret
        # can be what it quotes: the place is enough.
        mark = getattr(error, "problem_mark", None)
        place = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{path}: {place}not valid YAML (values that start with one of "
                           "* & ! | > % @ ` need quotes)"]) from None


class EnvironmentSettings(BaseSettings):
    """One key and its accounts from `BALANCE_EXPORTER_*` variables, for containers."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    api_key: str | None = None
    api_key_file: Path | None = None
    api_secret_file: Path | None = None
    key_name: str = "default"
    # Comma-separated short names; empty for an account-scoped key.
    accounts: str = ""
    base_url: str | None = None
    timeout_seconds: float | None = None
    nonce: Literal["milliseconds", "seconds"] | None = None
    requests_per_second: float | None = None
    interval_seconds: float | None = None
    show_pending_balances: bool | None = None

    @property
    def is_configured(self) -> bool:
        return self.api_key is not None or self.api_key_file is not None

    def to_document(self) -> dict[str, Any]:
        """The same shape as the YAML file, so both go through one validation."""
        key: dict[str, Any] = {"name": self.key_name, "api_key": self.api_key,
                               "api_key_file": self.api_key_file, "nonce": self.nonce,
                               "requests_per_second": self.requests_per_second}
        if self.api_secret_file is not None:
            key["api_secret_file"] = self.api_secret_file
        else:
            key["api_secret_env"] = f"{ENV_PREFIX}API_SECRET"
        names = [name.strip() for name in self.accounts.split(",") if name.strip()]
        account_fields = {"interval_seconds": self.interval_seconds,
                          "show_pending_balances": self.show_pending_balances}
        accounts = [{"key": self.key_name, "account": name, **account_fields} for name in names]
        gemini = {"base_url": self.base_url, "timeout_seconds": self.timeout_seconds}
        return {
            "gemini": _without_none(gemini),
            "keys": [_without_none(key)],
            "accounts": [_without_none(account) for account in accounts]
            or [_without_none({"key": self.key_name, **account_fields})],
        }


def _without_none(fields: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def load_config(path: Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """The config from `path`, or from `BALANCE_EXPORTER_*` variables when no file is given."""
    environ = os.environ if environ is None else environ
    if path is not None:
        return build_config(read_config_file(path), environ, path.parent)
    try:
        from_environment = EnvironmentSettings()
    except ValidationError as error:
        raise ConfigError(validation_problems(error, _variable_name)) from None
    if not from_environment.is_configured:
        raise ConfigError([
            f"no configuration: pass --config.file, or set {ENV_PREFIX}API_KEY (see README); "
            "`balance-exporter demo` runs against the built-in simulator"
        ])
    return build_config(from_environment.to_document(), environ)


def _variable_name(location: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + str(location[0]).upper() if location else "(environment)"
