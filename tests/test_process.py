"""The exporter and simulator as real processes: signals, reload, CLI checks, logs."""

import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers import exporter_document, free_port, simulator_document, wait_for

SECRETS = ("TOPSECRET-master", "TOPSECRET-account")


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "balance_exporter", *args]


def console_script(*args: str) -> list[str]:
    """The exporter as users start it: the console script pip installed beside this Python."""
    return [str(Path(sys.executable).with_name("balance-exporter")), *args]


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310  # loopback only
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


@pytest.fixture
def simulator_url(tmp_path: Path) -> Iterator[str]:
    state = tmp_path / "sim.yml"
    state.write_text(yaml.safe_dump(simulator_document()))
    port = free_port()
    process = subprocess.Popen(command("simulate", "--listen", f"127.0.0.1:{port}",
                                       "--state", str(state)), stdout=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_get(f"{url}/_sim/state")[0] == 200, "simulator")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


class Exporter:
    def __init__(self, config_path: Path, log_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command("--config.file", str(config_path),
                    "--web.listen-address", f"127.0.0.1:{self.port}", *flags),
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def metrics(self) -> str:
        return http_get(f"{self.url}/metrics")[1]

    def logs(self) -> str:
        return self.log_path.read_text()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def config_path(tmp_path: Path, simulator_url: str) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(exporter_document(simulator_url)))
    return path


@pytest.fixture
def running(config_path: Path, tmp_path: Path) -> Iterator[Exporter]:
    exporter = Exporter(config_path, tmp_path / "exporter.log", "--log.level", "debug")
    try:
        wait_for(lambda: exporter_ready(exporter), "exporter ready")
        yield exporter
    finally:
        exporter.close()


def test_sigterm_stops_cleanly_with_exit_code_0(running: Exporter) -> None:
    running.process.send_signal(signal.SIGTERM)
    # The bound is the contract (exit within 5 s), not a performance figure.
    assert running.process.wait(timeout=5) == 0
    assert '"exporter stopped"' in running.logs()


def test_sigint_stops_cleanly_too(running: Exporter) -> None:
    running.process.send_signal(signal.SIGINT)
    assert running.process.wait(timeout=5) == 0


def exporter_ready(exporter: Exporter) -> bool:
    """Ready, or an AssertionError with the log at once if the process has died."""
    if exporter.process.poll() is not None:
        raise AssertionError(f"the exporter exited {exporter.process.returncode}:\n"
                             + exporter.logs())
    return http_get(f"{exporter.url}/-/ready")[0] == 200


def polls_of(metrics: str, account: str) -> float:
    prefix = f'gemini_account_polls_total{{account="{account}"}} '
    (line,) = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


def test_sighup_reloads_config_and_keeps_unchanged_accounts(
    running: Exporter, config_path: Path, simulator_url: str
) -> None:
    before = polls_of(running.metrics(), "alpha")
    document = exporter_document(simulator_url)
    document["accounts"] = [
        account for account in document["accounts"] if account.get("account") != "gamma"]
    document["accounts"].append({"key": "treasury", "account": "gamma", "name": "renamed"})
    config_path.write_text(yaml.safe_dump(document))
    running.process.send_signal(signal.SIGHUP)
    wait_for(lambda: 'account="renamed"' in running.metrics(), "the reloaded account")
    metrics = running.metrics()
    assert 'gemini_balance_amount{account="alpha",currency="BTC"} 5.12345678' in metrics
    assert polls_of(metrics, "alpha") >= before  # not reset: the account carried over
    assert 'account="gamma"' not in metrics


def test_bad_reload_is_rejected_and_the_old_config_keeps_running(
    running: Exporter, config_path: Path
) -> None:
    config_path.write_text("keys: [}\n")
    running.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reload rejected" in running.logs(), "the rejection log line")
    assert running.process.poll() is None
    before = polls_of(running.metrics(), "alpha")
    wait_for(lambda: polls_of(running.metrics(), "alpha") > before, "polling to go on")


def test_logs_are_json_for_every_logger_and_never_carry_secrets(
    running: Exporter, simulator_url: str
) -> None:
    http_get(f"{running.url}/metrics")  # an aiohttp access log line at debug level
    request = urllib.request.Request(  # noqa: S310  # loopback only
        f"{simulator_url}/_sim/accounts/beta/faults", method="POST",
        data=json.dumps({"kind": "auth", "reason": "InvalidSignature", "count": 1}).encode())
    urllib.request.urlopen(request, timeout=2).close()  # noqa: S310
    wait_for(lambda: "InvalidSignature" in running.logs(), "the auth error log line")
    lines = [json.loads(line) for line in running.logs().splitlines()]
    loggers = {line.get("logger") for line in lines}
    assert {"balance_exporter.service", "aiohttp.access"} <= loggers
    (rejected,) = [line for line in lines if line.get("reason") == "InvalidSignature"]
    assert rejected["level"] == "error"
    assert rejected["account"] == "beta"
    assert rejected["key"] == "treasury"
    assert "hint" in rejected
    for secret in SECRETS:
        assert secret not in running.logs()


def test_config_check_prints_a_masked_summary(config_path: Path) -> None:
    result = subprocess.run(command("--config.file", str(config_path), "--config.check"),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "Config is valid." in result.stdout
    assert "alpha: key treasury" in result.stdout
    assert "roles are read at start, at each reload and every 3600s" in result.stdout
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr


def test_invalid_config_exits_2_naming_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("keys:\n  - {name: k, api_key: master-k, api_secret: TOPSECRET-master}\n"
                    "accounts:\n  - {key: ops, account: a}\n")
    for flags in (["--config.check"], []):
        result = subprocess.run(command("--config.file", str(path), *flags),
                                capture_output=True, text=True, check=False, timeout=30)
        assert result.returncode == 2
        assert "accounts[0].key: no key named 'ops'" in result.stderr
        assert "TOPSECRET" not in result.stdout + result.stderr


def test_version_flag() -> None:
    result = subprocess.run(command("--version"), capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert result.stdout.startswith("balance-exporter ")


EXAMPLE_CONFIG = Path(__file__).parent.parent / "deploy" / "config.example.yml"


def test_the_example_config_passes_the_check_once_its_secret_files_exist(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    shutil.copy(EXAMPLE_CONFIG, config)

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(console_script("--config.file", str(config), "--config.check"),
                              capture_output=True, text=True, check=False, timeout=30)
    missing = check()
    assert missing.returncode == 2
    assert "keys[0].api_key_file" in missing.stderr  # the step the user has left to do
    (tmp_path / "treasury.api_key").write_text("master-0123456789abcdef\n")
    (tmp_path / "treasury.api_secret").write_text("an-example-secret-of-some-length\n")
    checked = check()
    assert checked.returncode == 0, checked.stderr
    assert "treasury: api_key master-012…, secret file treasury.api_secret" in checked.stdout
    assert "listed every 900s, at most 20 pages of 500" in checked.stdout
    assert "Config is valid." in checked.stdout


def test_help_lists_the_subcommands_one_line_each() -> None:
    result = subprocess.run(console_script("--help"), capture_output=True, text=True,
                            check=False, timeout=30)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines if line.startswith(("  demo ", "  simulate "))] \
        == ["demo", "simulate"]


def test_the_demo_serves_this_machine_only_unless_told_otherwise() -> None:
    result = subprocess.run(command("demo", "--help"), capture_output=True, text=True,
                            check=False, timeout=30)
    assert "(default: 127.0.0.1:8397)" in " ".join(result.stdout.split())


def test_demo_serves_live_balances_without_credentials(tmp_path: Path) -> None:
    port = free_port()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("BALANCE_EXPORTER_")}
    process = subprocess.Popen(
        command("demo", "--web.listen-address", f"127.0.0.1:{port}", "--drift-seconds", "1"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        assert process.stdout is not None
        announced = process.stdout.readline() + process.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in announced
        wait_for(lambda: 'gemini_balance_amount{account="savings",currency="BTC"} 12.5'
                 in http_get(f"http://127.0.0.1:{port}/metrics")[1], "demo balances")
        assert "treasury-primary" in http_get(f"http://127.0.0.1:{port}/")[1]
        # The demo's account key streams balances@account.
        wait_for(lambda: "Key savings: stream up" in http_get(f"http://127.0.0.1:{port}/")[1],
                 "the demo's stream")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_port_in_use_stops_start_up_with_one_line_and_exit_3(
    config_path: Path, simulator_url: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            console_script("--config.file", str(config_path),
                           "--web.listen-address", f"127.0.0.1:{port}"),
            capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 3
    assert result.stderr.strip() == (
        f"balance-exporter: cannot listen on 127.0.0.1:{port}: address already in use")
    assert "Traceback" not in result.stdout + result.stderr
    assert "Unclosed" not in result.stdout + result.stderr
    # Bound before the first poll: not one request reached Gemini.
    state = json.loads(urllib.request.urlopen(  # noqa: S310  # loopback only
        f"{simulator_url}/_sim/state", timeout=2).read())
    assert all(key.get("requests", 0) == 0 for key in state["keys"].values())


@pytest.mark.parametrize("address", ["8397", "localhost:http", "[::1:80", ":99999"])
def test_a_malformed_listen_address_is_a_bad_flag_exit_2(
    config_path: Path, address: str
) -> None:
    result = subprocess.run(
        console_script("--config.file", str(config_path), "--web.listen-address", address),
        capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 2
    assert f"--web.listen-address: invalid _listen_address value: {address!r}" not in (
        result.stderr)
    assert "--web.listen-address" in result.stderr
    assert f"{address!r} is not HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_simulate_writes_its_config_and_secret_files_readable_by_the_owner_only(
    tmp_path: Path,
) -> None:
    written = tmp_path / "exporter.yml"
    written.write_text("old, world-readable")
    written.chmod(0o644)
    port = free_port()
    process = subprocess.Popen(command("simulate", "--listen", f"127.0.0.1:{port}",
                                       "--write-config", str(written)),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: "api_secret_file" in written.read_text(), "the written config")
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
        document = yaml.safe_load(written.read_text())
        assert {key["name"] for key in document["keys"]} == {"treasury", "savings"}
        # No secret inline: each is a file of its own beside the config, for the owner only.
        assert all("api_secret" not in key for key in document["keys"])
        secret_files = {key["api_secret_file"] for key in document["keys"]}
        assert secret_files == {"exporter.treasury.secret", "exporter.savings.secret"}
        for name in secret_files:
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
        checked = subprocess.run(console_script("--config.file", str(written), "--config.check"),
                                 capture_output=True, text=True, check=False, timeout=30)
        assert checked.returncode == 0, checked.stderr
        assert "secret file exporter.treasury.secret" in checked.stdout
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_slowloris_flood_under_a_low_descriptor_limit_leaves_metrics_up(
    config_path: Path, tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "exporter.log"

    def low_descriptor_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    with log_path.open("wb") as log:
        process = subprocess.Popen(
            console_script("--config.file", str(config_path),
                           "--web.listen-address", f"127.0.0.1:{port}"),
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=low_descriptor_limit)
    flood: list[socket.socket] = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: http_get(f"{url}/-/ready")[0] == 200, "exporter ready")
        for _ in range(150):  # more slow clients than the exporter may hold descriptors
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            client.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            flood.append(client)
        # The bound only guards against a hang: the scrape must get through at all.
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:  # noqa: S310
            assert response.status == 200
            assert "gemini_balance_amount" in response.read().decode()
        assert process.poll() is None
        logs = log_path.read_text()
        assert logs.count("Traceback") == 0
        assert logs.count("too many HTTP connections") <= 1  # once per interval, not per client
        assert "cannot accept HTTP connections" not in logs  # the cap kept descriptors free
    finally:
        for client in flood:
            client.close()
        process.kill()
        process.wait()


@pytest.mark.parametrize(("path", "problem"), [
    ("/-/ready", "is taken by the landing page or a probe"),
    ("/-/healthy", "is taken by the landing page or a probe"),
    ("/", "is taken by the landing page or a probe"),
    ("metrics", "is not an absolute URL path"),
    ("/me trics", "is not an absolute URL path"),
])
def test_a_telemetry_path_that_clashes_or_is_no_path_is_a_bad_flag_exit_2(
    config_path: Path, path: str, problem: str
) -> None:
    result = subprocess.run(
        console_script("--config.file", str(config_path), f"--web.telemetry-path={path}"),
        capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1  # one line, no usage text, no traceback
    assert "--web.telemetry-path" in result.stderr
    assert problem in result.stderr
