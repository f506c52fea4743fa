"""The pieces of the live chain: tracked processes, a webhook receiver, and configs generated
from the ones in deploy/ (same rules, shorter intervals and `for:` durations)."""

import json
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import http_json

ROOT = Path(__file__).parent.parent.parent
DEPLOY = ROOT / "deploy"
# Short enough for the whole chain to run in minutes; the absence alert keeps a longer one so
# that it does not fire while Prometheus is still discovering its first target.
FOR_OVERRIDES = {"GeminiBalanceExporterAbsent": "1m"}
DEFAULT_FOR = "2s"


class Processes:
    """Every process the chain starts, so that tear-down can stop them all and prove it did."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self._log_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.started.append(process)
        return process

    def log(self, name: str) -> str:
        return (self._log_dir / f"{name}.log").read_text(errors="replace")

    @staticmethod
    def stop(process: subprocess.Popen[bytes]) -> int:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return int(process.returncode)

    def stop_all(self) -> list[int]:
        """Stop everything; the PIDs of processes still alive afterwards (none, we expect)."""
        for process in self.started:
            self.stop(process)
        return [process.pid for process in self.started if process.poll() is None]


class WebhookReceiver:
    """Records every notification Alertmanager posts, by receiver path."""

    def __init__(self) -> None:
        self.notifications: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(length))
                with receiver._lock:
                    receiver.notifications.append((self.path, payload))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def alerts(self, alertname: str, status: str) -> Iterator[tuple[str, dict[str, str]]]:
        """(receiver path, labels) of every alert of that name and status received so far."""
        with self._lock:
            notifications = list(self.notifications)
        for path, payload in notifications:
            for alert in payload["alerts"]:
                if alert["labels"]["alertname"] == alertname and alert["status"] == status:
                    yield path, alert["labels"]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def alert_rules(path: Path) -> None:
    """deploy/alerts.yml with `for:` durations shortened for the test."""
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = FOR_OVERRIDES.get(rule["alert"], DEFAULT_FOR)
    path.write_text(yaml.safe_dump(rules))


def prometheus_config(path: Path, rules: Path, exporter_port: int, alertmanager_port: int) -> None:
    """deploy/prometheus.yml pointed at the test's processes, scraping every second."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules)]
    config["alerting"]["alertmanagers"][0]["static_configs"] = [
        {"targets": [f"127.0.0.1:{alertmanager_port}"]}]
    (job,) = config["scrape_configs"]
    job.update(scrape_interval="1s", scrape_timeout="1s",
               static_configs=[{"targets": [f"127.0.0.1:{exporter_port}"]}])
    path.write_text(yaml.safe_dump(config))


def alertmanager_config(path: Path, receiver_port: int) -> None:
    """deploy/alertmanager.yml with its receivers pointed at the test's webhook, grouping fast."""
    config = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    config["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    for receiver in config["receivers"]:
        for webhook in receiver["webhook_configs"]:
            webhook["url"] = f"http://127.0.0.1:{receiver_port}/{receiver['name']}"
            webhook["send_resolved"] = True
    path.write_text(yaml.safe_dump(config))


class Prometheus:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = http_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert reply["status"] == "success", reply
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        arguments = {"query": expr, "start": start, "end": end, "step": "1s"}
        reply = http_json(f"{self.url}/api/v1/query_range?" + urllib.parse.urlencode(arguments))
        assert reply["status"] == "success", reply
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result
