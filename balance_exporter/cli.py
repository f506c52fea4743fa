"""Command line: `balance-exporter` runs the exporter; `demo` and `simulate` use the simulator.

Flags follow Prometheus exporters (`--config.file`, `--web.listen-address`, ...). Exit codes:
0 after a clean stop or a good `--config.check`, 2 for a bad config or bad flags, 3 when the
HTTP server cannot listen on its address.
"""

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

import structlog
import yaml

from balance_exporter import __version__
from balance_exporter.config import Config, ConfigError, load_config
from balance_exporter.heap import freeze_startup_heap
from balance_exporter.logging import LOG_LEVELS, configure_logging
from balance_exporter.server import (
    DEFAULT_LISTEN_ADDRESS,
    ListenAddress,
    ListenError,
    WebOptions,
    telemetry_path_problem,
)
from balance_exporter.service import Service, run_until_signalled
from balance_exporter.targets import plan
from balance_exporter.webconfig import WebConfig, load_web_config

DEFAULT_SIMULATOR_ADDRESS = "127.0.0.1:8398"
# The demo is local: it serves made-up balances to this machine only, unless told otherwise.
DEFAULT_DEMO_ADDRESS = "127.0.0.1:8397"
EXIT_BAD_CONFIG = 2
EXIT_CANNOT_LISTEN = 3

log = structlog.get_logger("balance_exporter.cli")


def _add_logging_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log.level", dest="log_level", choices=LOG_LEVELS, default="info",
                        help="only log messages with this severity or above (default: info)")
    parser.add_argument("--log.format", dest="log_format", choices=("json", "console"),
                        default="json", help="log line format (default: json)")


class _FlagParser(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit 2, as Prometheus' exporters do it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_CONFIG, f"{self.prog}: error: {message} (see --help)\n")


def _telemetry_path(text: str) -> str:
    problem = telemetry_path_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _listen_address(text: str) -> ListenAddress:
    try:
        return ListenAddress.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_web_flags(parser: argparse.ArgumentParser,
                   listen_address: str = DEFAULT_LISTEN_ADDRESS) -> None:
    parser.add_argument("--web.listen-address", dest="listen_address", type=_listen_address,
                        default=listen_address,
                        help=f"address to serve metrics on (default: {listen_address})")
    parser.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics",
                        type=_telemetry_path,
                        help="path under which to expose metrics (default: /metrics)")
    parser.add_argument("--web.config.file", dest="web_config_file", type=Path,
                        help="exporter-toolkit web config file (TLS, basic auth)")


def _exporter_parser() -> argparse.ArgumentParser:
    parser = _FlagParser(
        prog="balance-exporter",
        description="Prometheus exporter for Gemini account balances.",
        epilog="subcommands (each with its own --help):\n"
        "  demo      the exporter polling a built-in Gemini simulator: no credentials, local only\n"
        "  simulate  the Gemini simulator alone, to point an exporter at (--write-config)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"balance-exporter {__version__}")
    parser.add_argument("--config.file", dest="config_file", type=Path,
                        help="YAML config file; without it, BALANCE_EXPORTER_* variables are read")
    parser.add_argument("--config.check", dest="config_check", action="store_true",
                        help="validate the config, print a summary (secrets masked) and exit")
    parser.add_argument("--storage.path", dest="storage_path", type=Path,
                        help="directory to keep each account's last accepted _timestamp in "
                        "across restarts (default: none, a restart starts clean)")
    _add_web_flags(parser)
    _add_logging_flags(parser)
    return parser


def _demo_parser() -> argparse.ArgumentParser:
    parser = _FlagParser(
        prog="balance-exporter demo",
        description="Run the built-in Gemini simulator and the exporter polling it, on this "
        "machine only by default.",
    )
    _add_web_flags(parser, DEFAULT_DEMO_ADDRESS)
    _add_logging_flags(parser)
    parser.add_argument("--drift-seconds", type=float, default=5.0,
                        help="move the simulated balances this often (default: 5)")
    return parser


def _simulate_parser() -> argparse.ArgumentParser:
    parser = _FlagParser(
        prog="balance-exporter simulate",
        description="Run the Gemini simulator alone (for tests, or to try the exporter by hand).",
    )
    parser.add_argument("--listen", type=_listen_address, default=DEFAULT_SIMULATOR_ADDRESS,
                        help=f"HOST:PORT to listen on (default: {DEFAULT_SIMULATOR_ADDRESS})")
    parser.add_argument("--state", type=Path,
                        help="YAML file of keys and accounts (default: the demo state)")
    parser.add_argument("--drift-seconds", type=float, default=0.0,
                        help="move balances this often; 0 keeps them still (default: 0)")
    parser.add_argument("--write-config", type=Path,
                        help="write an exporter config for this simulator to this file, and "
                        "each key's secret to a file beside it (mode 0600). The simulator keeps "
                        "running; without --state its keys and secrets are made afresh at each "
                        "start, so the config is good only while this run lasts")
    _add_logging_flags(parser)
    return parser


def _mask(text: str) -> str:
    return text[:10] + "…" if len(text) > 12 else "…"


def config_summary(config: Config) -> str:
    settings = config.settings
    lines = [f"Gemini: {settings.gemini.base_url} (timeout {settings.gemini.timeout_seconds:g}s)",
             "Keys:"]
    for index, key in enumerate(settings.keys):
        resolved = config.credentials[key.name]
        source = (f"file {key.api_secret_file}" if key.api_secret_file
                  else f"env {key.api_secret_env}" if key.api_secret_env else "inline")
        lines.append(f"  {key.name}: api_key {_mask(resolved.api_key)}, secret {source} "
                     f"(********), nonce {key.nonce}, {key.requests_per_second:g} req/s"
                     + (" [master]" if resolved.is_master else "") + f"  (keys[{index}])")
    for key in settings.keys:
        if key.discover is not None:
            discover = key.discover
            lines.append(f"  {key.name} discovers its group's accounts: include "
                         f"{', '.join(discover.include)}"
                         + (f", exclude {', '.join(discover.exclude)}" if discover.exclude else "")
                         + f", listed every {discover.refresh_seconds:g}s, "
                         f"at most {discover.max_pages} pages of 500")
        if key.stream is not None and key.stream.enabled:
            lines.append(f"  {key.name} streams balances@account from "
                         f"{settings.gemini.websocket_url}: a change polls the account's "
                         "balances as soon as the budget allows; regular polls at most every "
                         f"{key.stream.reconcile_interval_seconds:g}s while it is up")
    lines.append(f"Each key's roles are read at start, at each reload and every "
                 f"{settings.polling.roles_refresh_seconds:g}s")
    if settings.notional is not None:
        lines.append(f"Notional values in {settings.notional.currency}, every "
                     f"{settings.notional.interval_seconds:g}s unless an account says otherwise")
    if settings.approved_addresses is not None:
        allow_lists = settings.approved_addresses
        lines.append(f"Withdrawal allow-lists of {', '.join(allow_lists.networks)}, every "
                     f"{allow_lists.interval_seconds:g}s unless an account says otherwise (each "
                     "network a request of its own)")
    if settings.transfers is not None:
        lines.append(f"Transfers every {settings.transfers.interval_seconds:g}s unless an account "
                     "says otherwise (never two requests for one account within 5 s); the first "
                     f"poll looks back {settings.transfers.lookback_seconds:.0f}s")
    lines.append("Accounts:")
    planned = {target.label: target for target in plan(config).targets}
    for account in settings.accounts:
        target = planned[account.label]
        stretched = (f" (stretched from {account.interval_seconds:g}s to fit the key's budget)"
                     if target.interval_seconds > account.interval_seconds else "")
        gemini_account = target.gemini_account or "(the key's own)"
        extras = "".join(
            f", {what} every {interval:g}s" for what, interval in (
                ("notional", target.notional_interval_seconds),
                ("staking", target.staking_interval_seconds),
                (f"{len(target.allow_lists)} allow-lists", target.allow_list_interval_seconds),
                ("transfers", target.transfers_interval_seconds))
            if interval is not None)
        lines.append(f"  {target.label}: key {account.key}, account {gemini_account}, every "
                     f"{target.interval_seconds:g}s{stretched}, pending balances "
                     f"{'on' if target.show_pending_balances else 'off'}{extras}")
    if not settings.accounts:
        lines.append("  (none configured: discovered ones are planned after each listing)")
    lines += [f"Warning: {warning}" for warning in config.warnings]
    return "\n".join(lines)


def _load_web_config(path: Path | None) -> WebConfig | None:
    return load_web_config(path) if path is not None else None


def _web_options(args: argparse.Namespace) -> WebOptions:
    return WebOptions(
        listen_address=args.listen_address,
        telemetry_path=args.telemetry_path,
        web_config=_load_web_config(args.web_config_file),
        access_log=args.log_level == "debug",
    )


def _report_bad_config(error: ConfigError) -> int:
    print(f"balance-exporter: {error}", file=sys.stderr)
    return EXIT_BAD_CONFIG


def run_exporter(argv: Sequence[str]) -> int:
    args = _exporter_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        config = load_config(args.config_file)
        web_options = _web_options(args)
    except ConfigError as error:
        return _report_bad_config(error)
    if args.config_check:
        print(config_summary(config))
        print("Config is valid.")
        return 0
    for warning in config.warnings:
        log.warning("config warning", problem=warning)
    return _serve(run_until_signalled(Service(config, args.config_file, web_options,
                                              storage_path=args.storage_path)))


def _serve(running: Coroutine[Any, Any, None]) -> int:
    """Run the exporter until it is signalled to stop; the exit code says how it ended."""
    freeze_startup_heap()
    try:
        asyncio.run(running)
    except ListenError as error:
        print(f"balance-exporter: {error}", file=sys.stderr)
        return EXIT_CANNOT_LISTEN
    except ConfigError as error:  # a TLS certificate that cannot be loaded
        return _report_bad_config(error)
    return 0


def run_demo(argv: Sequence[str]) -> int:
    args = _demo_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        web_options = _web_options(args)
    except ConfigError as error:
        return _report_bad_config(error)
    from balance_exporter.demo import run_demo as run  # the simulator, only when asked for

    return _serve(run(web_options, args.drift_seconds))


def run_simulate(argv: Sequence[str]) -> int:
    args = _simulate_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    from balance_exporter.demo import run_simulator

    try:
        document = yaml.safe_load(args.state.read_text()) if args.state else None
        asyncio.run(run_simulator(args.listen, document, args.drift_seconds, args.write_config))
    except (OSError, ValueError, yaml.YAMLError) as error:
        print(f"balance-exporter simulate: {error}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": run_demo, "simulate": run_simulate}
    with contextlib.suppress(KeyboardInterrupt):
        if arguments and arguments[0] in commands:
            return commands[arguments[0]](arguments[1:])
        return run_exporter(arguments)
    return 0
