"""Table tests over the config files in testdata/config: good ones load, bad ones name the
problem (the `# expect:` line at the top of each file) and never show a secret."""

from pathlib import Path

import pytest

from balance_exporter.config import ConfigError, build_config, load_config

CONFIGS = Path(__file__).parent / "testdata" / "config"
GOOD = sorted((CONFIGS / "good").glob("*.yml"))
BAD = sorted((CONFIGS / "bad").glob("*.yml"))


def expected_problem(path: Path) -> str:
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# expect: "), f"{path.name} lacks its '# expect:' line"
    return first_line.removeprefix("# expect: ")


@pytest.mark.parametrize("path", GOOD, ids=lambda path: path.stem)
def test_good_configs_load(path: Path) -> None:
    config = load_config(path, environ={"TEST_OPS_SECRET": "TOPSECRET-env"})
    assert config.credentials
    assert "TOPSECRET" not in repr(config)


@pytest.mark.parametrize("path", BAD, ids=lambda path: path.stem)
def test_bad_configs_name_the_problem_without_secrets(path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert expected_problem(path) in message
    assert "TOPSECRET" not in message


def test_full_config_resolves_secrets_relative_to_the_file() -> None:
    config = load_config(CONFIGS / "good" / "full.yml",
                         environ={"TEST_OPS_SECRET": "TOPSECRET-from-env"})
    treasury, ops = config.credentials["treasury"], config.credentials["ops"]
    assert treasury.api_secret.get_secret_value() == "TOPSECRET-file-treasury"
    assert treasury.is_master
    assert ops.api_key == "account-fromfile"
    assert ops.api_secret.get_secret_value() == "TOPSECRET-from-env"
    assert [key.nonce for key in config.settings.keys] == ["milliseconds", "seconds"]
    labels = [account.label for account in config.settings.accounts]
    assert labels == ["treasury-primary", "trading", "ops"]
    assert config.precision.places_for("eth") == 9
    assert config.precision.places_for("USD") == 2
    assert config.precision.places_for("BTC") == 8  # a documented default
    assert config.precision.places_for("NEW") == 10


def test_minimal_config_takes_documented_defaults() -> None:
    config = load_config(CONFIGS / "good" / "minimal.yml", environ={})
    settings = config.settings
    assert settings.gemini.base_url == "https://api.gemini.com"
    assert settings.gemini.timeout_seconds == 10
    (account,) = settings.accounts
    assert (account.label, account.account, account.interval_seconds) == ("main", None, 30)
    assert account.show_pending_balances is False
    (key,) = settings.keys
    assert (key.requests_per_second, key.nonce) == (2, "milliseconds")
    assert config.warnings == ()


def test_a_fast_key_gets_a_warning() -> None:
    config = load_config(CONFIGS / "good" / "warn_fast_key.yml", environ={})
    assert config.warnings == (
        "keys[0].requests_per_second: 8 is above Gemini's recommended 5 per second",)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(
        "keys:\n  - {name: k, api_key: master-k}\n"
        "accounts:\n  - {key: k, account: a}\n  - {key: nope, account: b}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    assert len(caught.value.problems) == 2


ENV = {
    "BALANCE_EXPORTER_API_KEY": "master-env",
    "BALANCE_EXPORTER_API_SECRET": "TOPSECRET-env",
    "BALANCE_EXPORTER_ACCOUNTS": "primary, trading",
    "BALANCE_EXPORTER_INTERVAL_SECONDS": "15",
    "BALANCE_EXPORTER_SHOW_PENDING_BALANCES": "true",
    "BALANCE_EXPORTER_BASE_URL": "https://api.sandbox.gemini.com",
    "BALANCE_EXPORTER_REQUESTS_PER_SECOND": "3",
}


def test_one_key_and_its_accounts_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    config = load_config(None)
    key = config.credentials["default"]
    assert (key.api_key, key.api_secret.get_secret_value()) == ("master-env", "TOPSECRET-env")
    assert config.settings.keys[0].requests_per_second == 3
    assert config.settings.gemini.base_url == "https://api.sandbox.gemini.com"
    accounts = config.settings.accounts
    assert [(a.account, a.interval_seconds, a.show_pending_balances) for a in accounts] == [
        ("primary", 15, True), ("trading", 15, True)]


def test_environment_errors_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BALANCE_EXPORTER_API_KEY", "master-env")
    monkeypatch.setenv("BALANCE_EXPORTER_API_SECRET", "TOPSECRET-env")
    monkeypatch.setenv("BALANCE_EXPORTER_TIMEOUT_SECONDS", "soon")
    with pytest.raises(ConfigError, match="BALANCE_EXPORTER_TIMEOUT_SECONDS"):
        load_config(None)


def test_environment_master_key_without_accounts_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BALANCE_EXPORTER_API_KEY", "master-env")
    monkeypatch.setenv("BALANCE_EXPORTER_API_SECRET", "TOPSECRET-env")
    with pytest.raises(ConfigError, match="is a master key") as caught:
        load_config(None)
    assert "TOPSECRET" not in str(caught.value)


def test_no_config_at_all_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BALANCE_EXPORTER_API_KEY", raising=False)
    monkeypatch.delenv("BALANCE_EXPORTER_API_KEY_FILE", raising=False)
    with pytest.raises(ConfigError, match=r"--config\.file"):
        load_config(None)


def test_secret_files_are_reread_on_each_load(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("first-secret\n")
    path = tmp_path / "config.yml"
    path.write_text("keys:\n  - {name: k, api_key: account-k, api_secret_file: secret}\n"
                    "accounts:\n  - {key: k}\n")
    assert load_config(path, {}).credentials["k"].api_secret.get_secret_value() == "first-secret"
    secret.write_text("second-secret")
    assert load_config(path, {}).credentials["k"].api_secret.get_secret_value() == "second-secret"


def one_key(**fields: object) -> dict[str, object]:
    key = {"name": "k", "api_key": "account-k", "api_secret": "TOPSECRET-1", **fields}
    return {"keys": [key], "accounts": [{"key": "k"}]}


@pytest.mark.parametrize(("secret", "valid"), [
    ("x" * 9, False), ("x" * 10, True), ("x" * 256, True), ("x" * 257, False),
])
def test_secret_length_is_bounded_at_both_ends(secret: str, valid: bool) -> None:
    document = one_key(api_secret=secret)
    if valid:
        assert build_config(document, {}).credentials["k"].api_secret.get_secret_value() == secret
    else:
        with pytest.raises(ConfigError, match=r"keys\[0\]\.api_secret") as caught:
            build_config(document, {})
        assert secret not in str(caught.value)


@pytest.mark.parametrize(("seconds", "valid"), [(86400, True), (86400.5, False)])
def test_durations_are_bounded_at_one_day(seconds: float, valid: bool) -> None:
    document = {**one_key(), "polling": {"max_backoff_seconds": seconds,
                                         "rejected_retry_seconds": seconds},
                "gemini": {"max_timestamp_skew_seconds": seconds}}
    document["accounts"] = [{"key": "k", "interval_seconds": seconds}]
    if valid:
        assert build_config(document, {}).settings.polling.max_backoff_seconds == seconds
    else:
        with pytest.raises(ConfigError) as caught:
            build_config(document, {})
        assert len(caught.value.problems) == 4  # every duration names its own problem


def test_currency_keys_are_folded_to_upper_case_as_gemini_sends_them() -> None:
    document = {"keys": [{"name": "k", "api_key": "master-x", "api_secret": "TOPSECRET-1",
                          "discover": {"defaults": {"min_available": {"btc": 1}}}}],
                "accounts": [{"key": "k", "account": "a", "min_available": {"usd": 100}}],
                "precision": {"usd": 3}}
    config = build_config(document, {})
    assert config.settings.accounts[0].min_available == {"USD": 100}
    assert config.settings.keys[0].discover is not None
    assert config.settings.keys[0].discover.defaults.min_available == {"BTC": 1}
    assert config.settings.precision == {"USD": 3}
