"""Planning targets from the config: every account polled, its interval stretched to fit the
key's (and the shared) request budget."""

from balance_exporter.config import build_config
from balance_exporter.targets import plan_targets

SECRET = "TOPSECRET-targets"


def test_interval_is_stretched_to_fit_the_key_budget() -> None:
    config = build_config({
        "keys": [{"name": "k", "api_key": "master-k", "api_secret": SECRET,
                  "requests_per_second": 2},
                 {"name": "j", "api_key": "master-j", "api_secret": SECRET,
                  "requests_per_second": 5}],
        "accounts": [{"key": "k", "account": f"a{i}", "interval_seconds": 10} for i in range(50)]
        + [{"key": "j", "account": "b", "interval_seconds": 10}],
    }, {})
    planned = {target.label: target.interval_seconds for target in plan_targets(config)}
    assert planned["a0"] == 25.0  # 50 accounts at 2 per second
    assert planned["b"] == 10.0


def test_a_global_budget_stretches_every_account() -> None:
    config = build_config({
        "gemini": {"requests_per_second": 1},
        "keys": [{"name": "k", "api_key": "master-k", "api_secret": SECRET,
                  "requests_per_second": 5}],
        "accounts": [{"key": "k", "account": f"a{i}", "interval_seconds": 5} for i in range(20)],
    }, {})
    assert {target.interval_seconds for target in plan_targets(config)} == {20.0}


def test_targets_keep_the_gemini_account_label_and_thresholds() -> None:
    config = build_config({
        "keys": [{"name": "k", "api_key": "master-k", "api_secret": SECRET},
                 {"name": "solo", "api_key": "account-s", "api_secret": SECRET}],
        "accounts": [{"key": "k", "account": "primary", "name": "treasury",
                      "min_available": {"USD": 10, "BTC": 1}, "max_available_drop_ratio": 0.5},
                     {"key": "solo"}],
    }, {})
    treasury, solo = plan_targets(config)
    assert (treasury.label, treasury.key_name, treasury.gemini_account) == (
        "treasury", "k", "primary")
    assert treasury.min_available == (("BTC", 1.0), ("USD", 10.0))
    assert treasury.max_available_drop_ratio == 0.5
    assert (solo.label, solo.gemini_account, solo.min_available) == ("solo", None, ())
