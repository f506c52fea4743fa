"""What is polled: one target per configured account, with the interval its key's budget allows.

The plan is made from the config alone, before anything is polled, so `--config.check` can show
it and the scheduler, the store and the exposition all work from the same targets.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type only: the store and exposition import targets, not pydantic
    from balance_exporter.config import Config


@dataclass(frozen=True, slots=True)
class AccountTarget:
    """What is polled for one configured account, and the thresholds its alerts compare with."""

    # The `account` label value.
    label: str
    key_name: str
    # Gemini's short name for the account; None for an account-scoped key.
    gemini_account: str | None
    show_pending_balances: bool
    # The interval the scheduler can keep, which may be longer than the configured one.
    interval_seconds: float
    min_available: tuple[tuple[str, float], ...] = ()
    max_available_drop_ratio: float | None = None

    @property
    def identity(self) -> tuple[str, str, str | None, bool]:
        """What must stay the same for balances to carry over a config reload."""
        return (self.label, self.key_name, self.gemini_account, self.show_pending_balances)


def plan_targets(config: "Config") -> list[AccountTarget]:
    """Each account's target, with the interval stretched to what its key's budget allows."""
    settings = config.settings
    rates = {key.name: key.requests_per_second for key in settings.keys}
    per_key: dict[str, int] = {}
    for account in settings.accounts:
        per_key[account.key] = per_key.get(account.key, 0) + 1
    global_rate = settings.gemini.requests_per_second
    targets = []
    for account in settings.accounts:
        interval = max(account.interval_seconds, per_key[account.key] / rates[account.key])
        if global_rate is not None:
            interval = max(interval, len(settings.accounts) / global_rate)
        targets.append(AccountTarget(
            label=account.label,
            key_name=account.key,
            gemini_account=account.account,
            show_pending_balances=account.show_pending_balances,
            interval_seconds=interval,
            min_available=tuple(sorted(account.min_available.items())),
            max_available_drop_ratio=account.max_available_drop_ratio,
        ))
    return targets
