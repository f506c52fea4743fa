"""What the simulated Gemini holds: keys, accounts, balances, and injected faults."""

import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Any, Literal

from balance_exporter.simulator.ratelimit import RateLimiter
from balance_exporter.simulator.transfers import AccountSpacing, SimTransfer

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
# Prices in USD for /v1/notionalbalances, set through the control API (no market moves them).
DEFAULT_USD_PRICES = {"USD": Decimal(1), "BTC": Decimal(65000), "ETH": Decimal(3200),
                      "SOL": Decimal(150), "GUSD": Decimal(1), "EUR": Decimal("1.08")}
# Which endpoint a fault is served on: every private endpoint of the exporter, or any of them;
# account_list_page: only the listing's later pages (those asked for with `timestamp`).
FaultEndpoint = Literal["balances", "notional", "staking", "approved_addresses", "transfers",
                        "account_list", "account_list_page", "roles", "any"]
FAULT_ENDPOINTS: tuple[FaultEndpoint, ...] = ("balances", "notional", "staking",
                                              "approved_addresses", "transfers", "account_list",
                                              "account_list_page", "roles", "any")
ProviderFormat = Literal["amount", "object"]
STAKING_FIELDS = ("balance", "available", "availableForWithdrawal")


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
    endpoint: FaultEndpoint = "balances"

    def serves(self, endpoint: str) -> bool:
        return self.endpoint in (endpoint, "any")

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
        endpoint = document.get("endpoint", "balances")
        if endpoint not in FAULT_ENDPOINTS:
            raise ValueError(f"endpoint: expected one of {', '.join(FAULT_ENDPOINTS)}, "
                             f"got {endpoint!r}")
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
            endpoint=endpoint,
        )


def _decimal(where: str, value: object) -> Decimal:
    try:
        return Decimal(str(value))
    except ArithmeticError:
        raise ValueError(f"{where}: {value!r} is not a number") from None


class FaultQueue:
    """Faults waiting to be served, each on its endpoint, in the order they were added."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []

    def take(self, endpoint: str) -> Fault | None:
        fault = next((fault for fault in self.faults if fault.serves(endpoint)), None)
        if fault is not None and fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                self.faults.remove(fault)
        return fault


@dataclass
class SimStaking:
    values: dict[str, Decimal]
    providers: dict[str, Decimal]

    @classmethod
    def from_document(cls, currency: str, document: dict[str, Any]) -> "SimStaking":
        if not isinstance(document, dict) or "balance" not in document:
            raise ValueError(f"staking.{currency}: needs at least a balance")
        balance = _decimal(f"staking.{currency}.balance", document["balance"])
        values = {name: _decimal(f"staking.{currency}.{name}", document.get(name, balance))
                  for name in STAKING_FIELDS}
        providers = document.get("providers", {})
        if not isinstance(providers, dict):
            raise ValueError(f"staking.{currency}.providers: expected provider id -> amount")
        return cls(values, {str(provider): _decimal(f"staking.{currency}.providers", amount)
                            for provider, amount in providers.items()})


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


# How likely a drift step moves money in or out of an account, and how many transfers an account
# keeps at most (a demo left running for days stays small).
TRANSFER_CHANCE = 0.05
MAX_DRIFTED_TRANSFERS = 500
# The networks of Gemini's withdrawal allow-lists (/v1/approvedAddresses/account/{network}).
APPROVED_ADDRESS_NETWORKS = ("bitcoin", "ethereum", "solana", "litecoin", "bitcoincash", "zcash",
                             "filecoin", "dogecoin", "tezos", "polkadot", "avalanche", "cosmos",
                             "xrpl")
# active; pending-time: the 7-day hold after an address is requested; pending-mua: waiting for a
# second administrator.
APPROVED_ADDRESS_STATUSES = ("active", "pending-time", "pending-mua")


@dataclass
class SimApprovedAddress:
    """One entry of a withdrawal allow-list. A group-scope entry shows in the list of every
    account of the group(s) its account is in."""

    network: str
    address: str
    scope: Literal["account", "group"] = "account"
    status: str = "pending-time"
    label: str = ""
    created_ms: int = 0

    @classmethod
    def from_document(cls, document: object, now_ms: int) -> "SimApprovedAddress":
        if not isinstance(document, dict):
            raise ValueError("approved address: expected an object")
        network, address = document.get("network"), document.get("address")
        if network not in APPROVED_ADDRESS_NETWORKS:
            raise ValueError(f"network: expected one of {', '.join(APPROVED_ADDRESS_NETWORKS)}, "
                             f"got {network!r}")
        if not isinstance(address, str) or not address:
            raise ValueError("address: expected a non-empty string")
        scope = document.get("scope", "account")
        if scope not in ("account", "group"):
            raise ValueError(f"scope: expected account or group, got {scope!r}")
        status = document.get("status", "pending-time")
        if status not in APPROVED_ADDRESS_STATUSES:
            raise ValueError(f"status: expected one of {', '.join(APPROVED_ADDRESS_STATUSES)}, "
                             f"got {status!r}")
        created = document.get("created_ms", now_ms)
        if not isinstance(created, int) or isinstance(created, bool) or created < 0:
            raise ValueError(f"created_ms: expected milliseconds, got {created!r}")
        return cls(network, address, scope, status, str(document.get("label", "")), created)

    def same_entry(self, network: object, address: object, scope: object) -> bool:
        return (self.network, self.address, self.scope) == (network, address, scope)

    def describe(self) -> dict[str, str]:
        """As Gemini sends it: `createdAt` is milliseconds as a string."""
        return {"network": self.network, "scope": self.scope, "label": self.label,
                "status": self.status, "createdAt": str(self.created_ms),
                "address": self.address}


@dataclass
class SimAccount:
    name: str
    type: Literal["exchange", "custody"] = "exchange"
    balances: dict[str, SimBalance] = field(default_factory=dict)
    timestamp_format: TimestampFormat = "ns"
    number_format: NumberFormat = "string"
    faults: FaultQueue = field(default_factory=FaultQueue)
    # What /v1/account/list shows: `name` is the short name, this the display name.
    display_name: str = ""
    status: Literal["open", "closed"] = "open"
    created_ms: int = 1_589_310_000_000
    staking: dict[str, SimStaking] = field(default_factory=dict)
    # How `balanceByProvider` is sent: provider -> amount, or provider -> {"balance": amount}.
    provider_format: ProviderFormat = "amount"
    approved_addresses: list[SimApprovedAddress] = field(default_factory=list)
    transfers: list[SimTransfer] = field(default_factory=list)
    transfers_spacing: AccountSpacing = field(default_factory=AccountSpacing)
    # The last stamp served per endpoint (a stale fault goes back from it).
    last_stamps_ns: dict[str, int] = field(default_factory=dict)
    served: int = 0
    stale_served: int = 0

    @property
    def last_stamp_ns(self) -> int:
        return self.last_stamps_ns.get("balances", 0)

    def add_approved_address(self, document: object, now_ms: int) -> SimApprovedAddress:
        """Request an address (pending-time unless the document says otherwise); one address
        is on a network's list once per scope."""
        entry = SimApprovedAddress.from_document(document, now_ms)
        if any(old.same_entry(entry.network, entry.address, entry.scope)
               for old in self.approved_addresses):
            raise ValueError(f"{entry.address!r} is already on the {entry.network} list "
                             f"({entry.scope} scope)")
        self.approved_addresses.append(entry)
        return entry

    def transfer(self, eid: int) -> SimTransfer:
        for transfer in self.transfers:
            if transfer.eid == eid:
                return transfer
        raise ValueError(f"no transfer {eid} in {self.name!r}")

    def approved_address(self, document: object) -> SimApprovedAddress:
        """The entry a control call names by network, address and scope (default account)."""
        if not isinstance(document, dict):
            raise ValueError("expected an object with network and address")
        scope = document.get("scope", "account")
        for entry in self.approved_addresses:
            if entry.same_entry(document.get("network"), document.get("address"), scope):
                return entry
        raise ValueError(f"no {scope}-scope entry {document.get('address')!r} on the "
                         f"{document.get('network')!r} list of {self.name!r}")

    def set_staking(self, document: dict[str, Any]) -> None:
        if not isinstance(document, dict):
            raise ValueError("staking: expected a mapping of currency to staked amounts")
        self.staking = {currency: SimStaking.from_document(currency, values)
                        for currency, values in document.items()}

    def patch(self, document: dict[str, Any]) -> None:
        """Change the account's formats, status or display name (the control API's PATCH)."""
        if "timestamp_format" in document:
            self.timestamp_format = cast_timestamp_format(document["timestamp_format"])
        if "number_format" in document:
            self.number_format = cast_number_format(document["number_format"])
        if "status" in document:
            if document["status"] not in ("open", "closed"):
                raise ValueError(f"status: expected open or closed, got {document['status']!r}")
            self.status = document["status"]
        if "provider_format" in document:
            if document["provider_format"] not in ("amount", "object"):
                raise ValueError("provider_format: expected amount or object")
            self.provider_format = document["provider_format"]
        if "display_name" in document:
            self.display_name = str(document["display_name"])

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
            "status": self.status,
            "display_name": self.display_name,
            "faults": len(self.faults.faults),
            "served": self.served,
            "stale_served": self.stale_served,
            "last_timestamp_ns": self.last_stamp_ns,
            "balances": {
                currency: {name: str(value) for name, value in balance.values.items()}
                for currency, balance in self.balances.items()
            },
            "approved_addresses": [entry.describe() for entry in self.approved_addresses],
            "transfers": [transfer.describe() for transfer in self.transfers],
            "transfers_refused": self.transfers_spacing.refused,
            "staking": {
                currency: {**{name: str(value) for name, value in staking.values.items()},
                           "providers": {p: str(v) for p, v in staking.providers.items()}}
                for currency, staking in self.staking.items()
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
    # Faults for the key's /v1/account/list and /v1/roles, which are no one account's.
    faults: FaultQueue = field(default_factory=FaultQueue)

    @property
    def is_master(self) -> bool:
        return self.api_key.startswith("master-")

    def count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1


ROLE_NAMES = ("Auditor", "Trader", "FundManager", "AccountAdmin")


def key_roles(names: object, master: bool) -> frozenset[str]:
    """A key's roles, by Gemini's rules: Auditor alone or Trader and Fund Manager in any
    mix (Auditor cannot be combined with another role), and AccountAdmin on master keys."""
    if not isinstance(names, list) or not all(name in ROLE_NAMES for name in names):
        raise ValueError(f"roles: expected a list of {', '.join(ROLE_NAMES)}, got {names!r}")
    roles = frozenset(names)
    if "Auditor" in roles and roles & {"Trader", "FundManager"}:
        raise ValueError("roles: Auditor cannot be combined with Trader or FundManager")
    if "AccountAdmin" in roles and not master:
        raise ValueError("roles: AccountAdmin is a master key's role")
    return roles


def account_from_document(entry: dict[str, Any], created_ms: int) -> SimAccount:
    """An account from its state document entry (or the control API's POST)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ValueError("name: an account needs a name (its short name)")
    if entry.get("type", "exchange") not in ("exchange", "custody"):
        raise ValueError(f"type: expected exchange or custody, got {entry.get('type')!r}")
    created = entry.get("created_ms", created_ms)
    if not isinstance(created, int) or isinstance(created, bool) or created < 0:
        raise ValueError(f"created_ms: expected milliseconds, got {created!r}")
    account = SimAccount(name=entry["name"], type=entry.get("type", "exchange"),
                         display_name=str(entry.get("display_name", entry["name"].title())),
                         created_ms=created)
    account.patch(entry)
    account.set_balances(entry.get("balances", {}))
    account.set_staking(entry.get("staking", {}))
    addresses = entry.get("approved_addresses", [])
    if not isinstance(addresses, list):
        raise ValueError("approved_addresses: expected a list")
    for document in addresses:
        account.add_approved_address(document, created_ms)
    transfers = entry.get("transfers", [])
    if not isinstance(transfers, list):
        raise ValueError("transfers: expected a list")
    now_ms = int(time.time() * 1000)
    account.transfers = [SimTransfer.from_document(document, now_ms) for document in transfers]
    return account


@dataclass
class SimState:
    keys: dict[str, SimKey]
    accounts: dict[str, SimAccount]
    usd_prices: dict[str, Decimal] = field(default_factory=lambda: dict(DEFAULT_USD_PRICES))
    # Told of every balance change, with the currencies that changed (the WebSocket API).
    balance_listeners: list[Callable[[SimAccount, list[str]], None]] = field(
        default_factory=list)

    def balances_changed(self, account: SimAccount, currencies: list[str]) -> None:
        for listener in self.balance_listeners:
            listener(account, currencies)

    def set_prices(self, document: dict[str, Any]) -> None:
        """Prices in USD for some currencies (others keep theirs); USD stays 1."""
        if not isinstance(document, dict):
            raise ValueError("prices: expected a mapping of currency to its price in USD")
        prices = {str(currency).upper(): _decimal(f"prices.{currency}", price)
                  for currency, price in document.items()}
        if any(price <= 0 for price in prices.values()):
            raise ValueError("prices: every price must be above 0")
        self.usd_prices.update(prices)
        self.usd_prices["USD"] = Decimal(1)

    def approved_addresses(self, account: SimAccount, network: str) -> list[SimApprovedAddress]:
        """An account's allow-list of a network: its own entries, and the group-scope entries of
        every account of the groups (master keys) it is in."""
        group = {name for key in self.keys.values()
                 if key.is_master and account.name in key.accounts
                 for name in key.accounts} | {account.name}
        entries = [entry for entry in account.approved_addresses
                   if entry.network == network and entry.scope == "account"]
        seen: set[str] = set()
        for name in sorted(group):
            for entry in self.accounts[name].approved_addresses:
                if (entry.network == network and entry.scope == "group"
                        and entry.address not in seen):
                    seen.add(entry.address)
                    entries.append(entry)
        return entries

    def add_account(self, entry: dict[str, Any]) -> SimAccount:
        """Open a new account in the groups of `keys` (master keys; all of them by default)."""
        account = account_from_document(entry, 1_589_310_000_000 + len(self.accounts))
        if account.name in self.accounts:
            raise ValueError(f"name: there is already an account {account.name!r}")
        names = entry.get("keys")
        keys = ([self.keys[name] for name in names if name in self.keys] if names is not None
                else [key for key in self.keys.values() if key.is_master])
        if names is not None and len(keys) != len(names):
            raise ValueError("keys: no such API key")
        self.accounts[account.name] = account
        for key in keys:
            key.accounts.append(account.name)
        return account

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> "SimState":
        accounts: dict[str, SimAccount] = {}
        for index, entry in enumerate(document.get("accounts", [])):
            try:
                account = account_from_document(entry, 1_589_310_000_000 + index)
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
                    roles=key_roles(entry.get("roles", ["Auditor"]),
                                    str(entry["api_key"]).startswith("master-")),
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
        """Move every balance a little, and now and then deposit or withdraw some, so that a
        demo dashboard is alive."""
        now_ms = int(time.time() * 1000)
        for account in self.accounts.values():
            if account.balances and rng.random() < TRANSFER_CHANCE:
                currency = rng.choice(sorted(account.balances))
                amount = (account.balances[currency].values["amount"] * Decimal(
                    str(rng.uniform(0.001, 0.01)))).quantize(Decimal("0.01"), ROUND_DOWN)
                account.transfers.append(SimTransfer.from_document({
                    "type": rng.choice(("Deposit", "Withdrawal")), "currency": currency,
                    "amount": str(amount)}, now_ms))
                del account.transfers[:-MAX_DRIFTED_TRANSFERS]
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
            if account.balances:
                self.balances_changed(account, sorted(account.balances))


def demo_document() -> dict[str, Any]:
    """A master key over a group (three open exchange accounts, a custody and a closed one) and
    an account-scoped key, with fresh random secrets. The trading desk has a withdrawal address
    in its 7-day hold and a withdrawal pending for two hours: the demo shows the alert-worthy
    state of the allow-lists and of the money movements."""
    def secret() -> str:
        return secrets.token_urlsafe(24)

    now_ms = int(time.time() * 1000)

    return {
        "keys": [
            {"api_key": "master-" + secrets.token_hex(8), "api_secret": secret(),
             "accounts": ["primary", "trading", "ops", "vault", "old-desk"],
             "roles": ["Auditor"]},
            {"api_key": "account-" + secrets.token_hex(8), "api_secret": secret(),
             # Trader as well as the balances: the demo shows the exporter's warning about it.
             # Time-based nonces: it streams balances@account.
             "accounts": ["savings"], "roles": ["Trader"], "nonce": "seconds"},
        ],
        "accounts": [
            {"name": "primary", "display_name": "Primary treasury", "staking": {
                "ETH": {"balance": "64", "available": "64", "availableForWithdrawal": "60",
                        "providers": {"62b21e17-2534-4b9f-afcf-b7edb609dd8d": "40",
                                      "8f3c8a76-64c0-4e0e-a4c4-c8b7c7f1d7e9": "24"}}},
             "balances": {
                "BTC": {"amount": "5.0", "available": "4.5", "availableForWithdrawal": "4.5"},
                "USD": {"amount": "15000.00", "available": "5000.00",
                        "availableForWithdrawal": "5000.00"},
                "ETH": {"amount": "10.0", "available": "10.0", "availableForWithdrawal": "10.0"},
            }, "approved_addresses": [
                {"network": "bitcoin", "address": "bc1qxy2kgdygjrsqtzq2n0yrf2493p83kkfjhx0wlh",
                 "label": "Cold storage", "status": "active", "created_ms": 1_700_000_000_000},
                {"network": "ethereum", "address": "0x71C7656EC7ab88b098defB751B7401B5f6d8976F",
                 "label": "Group settlement", "scope": "group", "status": "active",
                 "created_ms": 1_700_000_100_000}]},
            {"name": "trading", "display_name": "Trading desk", "timestamp_format": "iso",
             "provider_format": "object", "staking": {
                 "SOL": {"balance": "500", "providers": {
                     "62b21e17-2534-4b9f-afcf-b7edb609dd8d": "500"}}},
             "balances": {
                "BTC": {"amount": "1.25", "available": "1.0", "availableForWithdrawal": "1.0",
                        "pendingWithdrawal": "0.25"},
                "USD": {"amount": "250000.00", "pendingDeposit": "10000.00"},
                "SOL": {"amount": "830.5"},
            }, "approved_addresses": [
                {"network": "bitcoin", "address": "bc1q9h7garjvkz0t4cl5k7z3h8gk8d3qv5yq5z6m2w",
                 "label": "Requested today", "status": "pending-time"}], "transfers": [
                {"type": "Deposit", "currency": "USD", "amount": "50000.00",
                 "timestamp_ms": now_ms - 26 * 3_600_000},
                {"type": "Withdrawal", "status": "Pending", "currency": "BTC", "amount": "0.25",
                 "timestamp_ms": now_ms - 2 * 3_600_000, "network": "bitcoin",
                 "destination": "bc1q9h7garjvkz0t4cl5k7z3h8gk8d3qv5yq5z6m2w",
                 "tx_hash": "8a3f0c2e9b1d4f6a7c5e3b2d1f0e9c8b7a6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b"},
                {"type": "Deposit", "status": "Pending", "currency": "USD",
                 "amount": "10000.00", "timestamp_ms": now_ms - 600_000}]},
            {"name": "ops", "number_format": "number", "balances": {
                "USD": {"amount": "42000.00", "available": "41000.00"},
            }},
            {"name": "savings", "balances": {
                "USD": {"amount": "1000000.00"}, "BTC": {"amount": "12.5"},
            }, "staking": {"ETH": {"balance": "12.25"}}},
            {"name": "vault", "display_name": "Cold storage", "type": "custody",
             "balances": {}},
            {"name": "old-desk", "display_name": "Closed desk", "status": "closed",
             "balances": {"USD": {"amount": "0"}}},
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
