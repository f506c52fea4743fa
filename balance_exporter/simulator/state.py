"""What the simulated Gemini holds: keys, accounts, balances, and injected faults."""

import random
import secrets
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any, Literal

from balance_exporter.simulator.ratelimit import RateLimiter

TimestampFormat = Literal["ns", "iso", "none"]
NumberFormat = Literal["string", "number"]
FaultKind = Literal["stale", "latency", "status", "html", "garbage", "rate_limit", "auth",
                    "future", "redirect", "huge"]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "stale", "latency", "status", "html", "garbage", "rate_limit", "auth", "future", "redirect",
    "huge",
)
# A hostile reply is still bounded here: the simulator must not take the test machine down.
MAX_HUGE_FAULT_BYTES = 1024 * 1024 * 1024
BALANCE_FIELDS = ("amount", "available", "availableForWithdrawal", "pendingWithdrawal",
                  "pendingDeposit")
# Notional prices in USD for /v1/notionalbalances; fixed, the simulator is no market.
USD_PRICES = {"USD": Decimal(1), "BTC": Decimal(65000), "ETH": Decimal(3200),
              "SOL": Decimal(150), "GUSD": Decimal(1), "EUR": Decimal("1.08")}


@dataclass
class Fault:
    kind: FaultKind
    remaining: int | None = None  # None: until cleared
    status: int = 500
    reason: str = "System"
    delay_seconds: float = 0.0
    # Sent as the Retry-After header's text, whatever it is (a hostile server's, say).
    retry_after: str | None = "1"
    # future: how far ahead of the clock the stamp is; redirect: where to.
    offset_seconds: float = 0.0
    location: str = ""
    # huge: how many bytes the body has (decompressed, with gzip: a gzip bomb of zeros).
    size_bytes: int = 0
    gzip: bool = False

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> "Fault":
        kind = document.get("kind")
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(FAULT_KINDS)}, got {kind!r}")
        defaults = {"auth": (400, "InvalidSignature"), "html": (502, "BadGateway"),
                    "redirect": (302, "Redirect")}
        status, reason = defaults.get(kind, (500, "System"))
        count = document.get("count")
        if count is not None and (not isinstance(count, int) or count < 1):
            raise ValueError("count: expected a positive whole number or null (until cleared)")
        size = int(document.get("size_bytes", 0))
        if not 0 <= size <= MAX_HUGE_FAULT_BYTES:
            raise ValueError(f"size_bytes: expected 0 to {MAX_HUGE_FAULT_BYTES}")
        retry_after = document.get("retry_after", 1)
        return cls(
            kind=kind,
            remaining=count,
            status=int(document.get("status", status)),
            reason=str(document.get("reason", reason)),
            delay_seconds=float(document.get("delay_seconds", 0.0)),
            retry_after=None if retry_after is None else str(retry_after),
            offset_seconds=float(document.get("offset_seconds", 0.0)),
            location=str(document.get("location", "")),
            size_bytes=size,
            gzip=bool(document.get("gzip", False)),
        )


@dataclass
class SimBalance:
    values: dict[str, Decimal]

    @classmethod
    def from_document(cls, currency: str, document: dict[str, Any]) -> "SimBalance":
        try:
            amount = Decimal(str(document["amount"]))
            values = {"amount": amount}
            for name in BALANCE_FIELDS[1:3]:
                values[name] = Decimal(str(document.get(name, amount)))
            for name in BALANCE_FIELDS[3:]:
                values[name] = Decimal(str(document.get(name, 0)))
        except (KeyError, ArithmeticError, ValueError) as error:
            raise ValueError(f"balances.{currency}: needs numeric amounts ({error!r})") from None
        return cls(values)


@dataclass
class SimAccount:
    name: str
    type: Literal["exchange", "custody"] = "exchange"
    balances: dict[str, SimBalance] = field(default_factory=dict)
    timestamp_format: TimestampFormat = "ns"
    number_format: NumberFormat = "string"
    faults: list[Fault] = field(default_factory=list)
    last_stamp_ns: int = 0
    served: int = 0
    stale_served: int = 0

    def take_fault(self) -> Fault | None:
        if not self.faults:
            return None
        fault = self.faults[0]
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                self.faults.pop(0)
        return fault

    def set_balances(self, document: dict[str, Any]) -> None:
        if not isinstance(document, dict):
            raise ValueError("balances: expected a mapping of currency to amounts")
        self.balances = {
            currency: SimBalance.from_document(currency, values)
            for currency, values in document.items()
        }

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "timestamp_format": self.timestamp_format,
            "number_format": self.number_format,
            "faults": len(self.faults),
            "served": self.served,
            "stale_served": self.stale_served,
            "last_timestamp_ns": self.last_stamp_ns,
            "balances": {
                currency: {name: str(value) for name, value in balance.values.items()}
                for currency, balance in self.balances.items()
            },
        }


@dataclass
class SimKey:
    api_key: str
    api_secret: str
    accounts: list[str]
    nonce: Literal["milliseconds", "seconds"] = "milliseconds"
    roles: frozenset[str] = frozenset({"Auditor"})
    limiter: RateLimiter = field(default_factory=RateLimiter)
    last_nonce: int = 0
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def is_master(self) -> bool:
        return self.api_key.startswith("master-")

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1


@dataclass
class SimState:
    keys: dict[str, SimKey]
    accounts: dict[str, SimAccount]

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> "SimState":
        accounts: dict[str, SimAccount] = {}
        for index, entry in enumerate(document.get("accounts", [])):
            try:
                account = SimAccount(
                    name=str(entry["name"]),
                    type=entry.get("type", "exchange"),
                    timestamp_format=cast_timestamp_format(entry.get("timestamp_format", "ns")),
                    number_format=cast_number_format(entry.get("number_format", "string")),
                )
                account.set_balances(entry.get("balances", {}))
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"accounts[{index}]: {error}") from None
            accounts[account.name] = account
        keys: dict[str, SimKey] = {}
        for index, entry in enumerate(document.get("keys", [])):
            try:
                key = SimKey(
                    api_key=str(entry["api_key"]),
                    api_secret=str(entry["api_secret"]),
                    accounts=[str(name) for name in entry["accounts"]],
                    nonce=entry.get("nonce", "milliseconds"),
                    roles=frozenset(entry.get("roles", ["Auditor"])),
                    limiter=RateLimiter(
                        per_minute=float(entry.get("rate_limit_per_minute", 600)),
                        queued=int(entry.get("rate_limit_queued", 5)),
                    ),
                )
            except (KeyError, TypeError) as error:
                raise ValueError(f"keys[{index}]: missing or wrong field {error}") from None
            unknown = [name for name in key.accounts if name not in accounts]
            if unknown:
                raise ValueError(f"keys[{index}].accounts: no such account {unknown[0]!r}")
            keys[key.api_key] = key
        return cls(keys=keys, accounts=accounts)

    def drift(self, rng: random.Random) -> None:
        """Move every balance a little, so that a demo dashboard is alive."""
        for account in self.accounts.values():
            for currency, balance in account.balances.items():
                places = Decimal("0.01") if currency in ("USD", "EUR", "GBP") else Decimal(
                    "0.00000001")
                values = balance.values
                factor = Decimal(str(1 + rng.gauss(0, 0.003)))
                amount = max(Decimal(0), values["amount"] * factor).quantize(places, ROUND_DOWN)
                held = Decimal(str(rng.uniform(0, 0.1)))
                available = (amount * (1 - held)).quantize(places, ROUND_DOWN)
                values.update(amount=amount, available=available,
                              availableForWithdrawal=available)


def demo_document() -> dict[str, Any]:
    """A master key over three accounts and an account-scoped key, with fresh random secrets."""
    def secret() -> str:
        return secrets.token_urlsafe(24)

    return {
        "keys": [
            {"api_key": "master-" + secrets.token_hex(8), "api_secret": secret(),
             "accounts": ["primary", "trading", "ops", "vault"], "roles": ["Auditor"]},
            {"api_key": "account-" + secrets.token_hex(8), "api_secret": secret(),
             "accounts": ["savings"], "roles": ["Auditor"]},
        ],
        "accounts": [
            {"name": "primary", "balances": {
                "BTC": {"amount": "5.0", "available": "4.5", "availableForWithdrawal": "4.5"},
                "USD": {"amount": "15000.00", "available": "5000.00",
                        "availableForWithdrawal": "5000.00"},
                "ETH": {"amount": "10.0", "available": "10.0", "availableForWithdrawal": "10.0"},
            }},
            {"name": "trading", "timestamp_format": "iso", "balances": {
                "BTC": {"amount": "1.25", "available": "1.0", "availableForWithdrawal": "1.0",
                        "pendingWithdrawal": "0.25"},
                "USD": {"amount": "250000.00", "pendingDeposit": "10000.00"},
                "SOL": {"amount": "830.5"},
            }},
            {"name": "ops", "number_format": "number", "balances": {
                "USD": {"amount": "42000.00", "available": "41000.00"},
            }},
            {"name": "savings", "balances": {
                "USD": {"amount": "1000000.00"}, "BTC": {"amount": "12.5"},
            }},
            {"name": "vault", "type": "custody", "balances": {}},
        ],
    }


def cast_timestamp_format(value: object) -> TimestampFormat:
    if value not in ("ns", "iso", "none"):
        raise ValueError(f"timestamp_format: expected ns, iso or none, got {value!r}")
    return value


def cast_number_format(value: object) -> NumberFormat:
    if value not in ("string", "number"):
        raise ValueError(f"number_format: expected string or number, got {value!r}")
    return value
