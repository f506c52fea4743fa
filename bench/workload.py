"""Synthetic stores of a given size, as the pollers would leave them (no I/O)."""

from balance_exporter.gemini.replies import BalanceReply, CurrencyBalance
from balance_exporter.store import BalanceStore
from balance_exporter.targets import AccountTarget, Endpoint

KEYS = 10


def account_label(index: int) -> str:
    return f"sub-account-{index:04d}"


def record(store: BalanceStore, index: int, generation: int, currencies: int) -> None:
    """One accepted reply for an account; `generation` moves every value."""
    balances = tuple(
        CurrencyBalance(f"CUR{c:02d}", 1000.0 + index + c / 7 + generation,
                        900.0 + index + c / 11 + generation, 900.0 + index + generation,
                        c * 0.125, c * 0.25)
        for c in range(currencies))
    stamp = 1_700_000_000_000_000_000 + generation * 1_000_000_000 + index
    store.record_reply(account_label(index), Endpoint.BALANCES,
                       BalanceReply(balances, stamp, "exchange"), 0.05,
                       1_700_000_000.0 + generation)


def make_store(accounts: int, currencies: int) -> BalanceStore:
    """accounts x currencies x 5 balance series (all accounts ask for pending balances)."""
    store = BalanceStore()
    store.configure(
        [AccountTarget(account_label(i), f"key-{i % KEYS}", f"a{i}", True, 30.0)
         for i in range(accounts)],
        [f"key-{k}" for k in range(KEYS)])
    for index in range(accounts):
        record(store, index, 0, currencies)
    return store
