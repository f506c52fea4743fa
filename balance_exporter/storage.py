"""`--storage.path`: each account's last accepted `_timestamp` per endpoint, kept across restarts.

Without it, the first reply after a restart is accepted whatever its stamp, so a stale server
could win once. The file is written atomically (a temporary file, fsync, rename) whenever a
stamp moved, at most every few seconds and at stop; it is read at start. An unreadable or
corrupt file is a warning and a clean start, never a reason not to start: the stamps only ever
make the exporter stricter.
"""

import asyncio
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog

from balance_exporter.files import write_private_file
from balance_exporter.store import BalanceStore, SavedStamp
from balance_exporter.targets import Endpoint

log = structlog.get_logger("balance_exporter.storage")

STATE_FILE_NAME = "state.json"
# Version 1 kept the balances stamp only; it is still read.
STATE_VERSION = 2
_STAMP_VERSIONS = (1, 2)
SAVE_EVERY_SECONDS = 5.0
# A state file of a million accounts is no state file of ours.
MAX_STATE_BYTES = 64 * 1024 * 1024
ENDPOINTS = frozenset(endpoint.value for endpoint in Endpoint)


def load_stamps(directory: Path, now_ns: int, max_skew_seconds: float) -> dict[str, SavedStamp]:
    """The stamps saved in `directory`, by account label; {} (and a warning) if there are none
    that can be used. Stamps further in the future than the skew allows are dropped, as a reply
    with them would be."""
    path = directory / STATE_FILE_NAME
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
        document = json.loads(path.read_bytes())
        version = document.get("version")
        accounts = document["accounts"] if version in _STAMP_VERSIONS else None
        if not isinstance(accounts, dict):
            raise ValueError(f"not a version {STATE_VERSION} state file")
        stamps = {label: SavedStamp(str(entry["key"]), entry["account"], _entry_stamps(entry))
                  for label, entry in accounts.items()}
    except FileNotFoundError:
        log.info("no saved state yet, starting clean", path=str(path))
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
        log.warning("saved state unreadable, starting clean", path=str(path),
                    error=f"{type(error).__name__}: {str(error)[:200]}")
        return {}
    limit = now_ns + int(max_skew_seconds * 1e9) if max_skew_seconds > 0 else None
    usable = {label: stamp for label, stamp in stamps.items()
              if (limit is None or max(stamp.stamps.values()) <= limit)
              and (stamp.gemini_account is None or isinstance(stamp.gemini_account, str))}
    if len(usable) < len(stamps):
        log.warning("saved stamps ignored (from the future, or malformed)",
                    ignored=len(stamps) - len(usable), path=str(path))
    return usable


def _entry_stamps(entry: dict[str, object]) -> dict[str, int]:
    if "server_timestamp_ns" in entry:  # version 1
        return {"balances": int(entry["server_timestamp_ns"])}  # type: ignore[call-overload]
    stamps = entry["server_timestamps_ns"]
    if not isinstance(stamps, dict) or not stamps or not all(
            name in ENDPOINTS for name in stamps):
        raise ValueError("an account's server_timestamps_ns is not a mapping of endpoints")
    return {str(name): int(stamp) for name, stamp in stamps.items()}


def save_stamps(directory: Path, stamps: Mapping[str, SavedStamp]) -> None:
    """Replace the state file atomically, readable by its owner only."""
    document = {"version": STATE_VERSION, "accounts": {
        label: {"key": stamp.key_name, "account": stamp.gemini_account,
                "server_timestamps_ns": dict(stamp.stamps)}
        for label, stamp in stamps.items()}}
    directory.mkdir(parents=True, exist_ok=True)
    write_private_file(directory / STATE_FILE_NAME, json.dumps(document, separators=(",", ":")))


class StatePersister:
    """Saves the store's stamps whenever they moved: every few seconds, and once more at stop."""

    def __init__(
        self, store: BalanceStore, directory: Path, on_failure: Callable[[], None]
    ) -> None:
        self._store = store
        self._directory = directory
        self._on_failure = on_failure
        self._saved: dict[str, SavedStamp] | None = None

    async def save_if_changed(self) -> None:
        stamps = self._store.saved_stamps()
        if stamps == self._saved:
            return
        try:
            await asyncio.to_thread(save_stamps, self._directory, stamps)
        except OSError as error:
            self._on_failure()
            log.error("saving state failed; stamps are kept in memory and saved again later",
                      path=str(self._directory), error=str(error)[:200])
            return
        self._saved = stamps

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY_SECONDS)
            await self.save_if_changed()
