"""Synthetic stores of a given size, as the pollers would leave them (no I/O)."""

from dataclasses import replace

from balance_exporter.gemini.replies import (
    BalanceReply,
    CurrencyBalance,
    NotionalBalance,
    ParsedReply,
    StakingBalance,
)
from balance_exporter.store import BalanceStore
from balance_exporter.targets import AccountTarget, Endpoint

KEYS = 10
# With the treasury families: staked balances in this many currencies, at two providers each.
STAKED_CURRENCIES = 5
PROVIDERS = ("5d3c9a0e-8f0b-4c8e-9a52-0e6f1f6d2a11", "9b1f3e2a-1c4d-4e7f-8a9b-2c3d4e5f6a7b")


def account_label(index: int) -> str:
    return f"sub-account-{index:04d}"


def record(store: BalanceStore, index: int, generation: int, currencies: int,
           moved: bool = True) -> None:
    """One accepted reply for an account on every endpoint it polls; `generation` moves every
    value, or with `moved` False only the reply's stamp and time (a poll that found the balances
    as they were)."""
    target = next(s.target for s in store.account_snapshots()
                  if s.target.label == account_label(index))
    label, wall = target.label, 1_700_000_000.0 + generation
    stamp = 1_700_000_000_000_000_000 + generation * 1_000_000_000 + index
    generation = generation if moved else 0
    balances = tuple(
        CurrencyBalance(f"CUR{c:02d}", 1000.0 + index + c / 7 + generation,
                        900.0 + index + c / 11 + generation, 900.0 + index + generation,
                        c * 0.125, c * 0.25)
        for c in range(currencies))
    store.record_reply(label, Endpoint.BALANCES, BalanceReply(balances, stamp, "exchange"), 0.05,
                       wall)
    if target.notional_interval_seconds is not None:
        notional = tuple(NotionalBalance(b.currency, round(b.amount * 65.5, 2),
                                         round(b.available * 65.5, 2),
                                         round(b.available_for_withdrawal * 65.5, 2))
                         for b in balances)
        store.record_reply(label, Endpoint.NOTIONAL, ParsedReply(notional, stamp), 0.05, wall)
    if target.staking_interval_seconds is not None:
        staking = tuple(StakingBalance(f"STK{c}", 32.0 + c + generation, 30.0 + c, 28.0 + c,
                                       tuple((p, 16.0 + c + i) for i, p in enumerate(PROVIDERS)))
                        for c in range(STAKED_CURRENCIES))
        store.record_reply(label, Endpoint.STAKING, ParsedReply(staking, stamp), 0.05, wall)


def make_store(accounts: int, currencies: int, treasury: bool = False) -> BalanceStore:
    """accounts x currencies x 5 balance series (all accounts ask for pending balances); with
    `treasury`, also x 3 notional series, and 5 staked currencies x 5 series."""
    targets = [AccountTarget(account_label(i), f"key-{i % KEYS}", f"a{i}", True, 30.0)
               for i in range(accounts)]
    if treasury:
        targets = [replace(target, notional_currency="USD", notional_interval_seconds=300.0,
                           staking_interval_seconds=300.0, min_available_notional=1000.0)
                   for target in targets]
    store = BalanceStore()
    store.configure(targets, [f"key-{k}" for k in range(KEYS)])
    for index in range(accounts):
        record(store, index, 0, currencies)
    return store
