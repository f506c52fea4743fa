"""The /metrics body, kept rendered between scrapes so that a scrape costs a copy, not a render.

prometheus_client renders about 100k series a second and blocks the event loop (and so every
poller) while it does. Here each account's samples are rendered once per change of that account,
by prometheus_client's own encoders on a collector of that one account, so the bytes are the
library's by construction. The text is kept per (account, family), together with a gzip member
of it: concatenated gzip members are a valid gzip stream, so a gzipped body is assembled without
compressing anything that did not change. Dirty accounts are rendered in small batches that
yield to the event loop between them. What is not per account (keys, build, process metrics) is
small and rendered on every scrape.
"""

import asyncio
import gzip
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from balance_exporter.metrics import (
    ExporterCounters,
    account_families,
    exporter_families,
    register_process_collectors,
)
from balance_exporter.store import AccountSnapshot, BalanceStore

log = structlog.get_logger("balance_exporter.exposition")

TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_EOF = b"# EOF\n"
# About a millisecond of rendering per account of 100 series: a batch stays well under 20 ms.
ACCOUNTS_PER_BATCH = 4
GZIP_LEVEL = 6


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


@dataclass(frozen=True)
class ExpositionFormat:
    encode: Callable[[Collector], bytes]
    content_type: str
    trailer: bytes  # what the encoder ends every exposition with

    def split(self, rendered: bytes) -> list[tuple[bytes, bytes]]:
        """(header lines, sample lines) per family, in the order rendered."""
        families: list[tuple[bytes, bytes]] = []
        body = rendered.removesuffix(self.trailer)
        for chunk in body.split(b"# HELP ")[1:]:
            lines = (b"# HELP " + chunk).splitlines(keepends=True)
            header = b"".join(line for line in lines if line.startswith(b"#"))
            samples = b"".join(line for line in lines if not line.startswith(b"#"))
            families.append((header, samples))
        return families


TEXT = ExpositionFormat(generate_latest, TEXT_TYPE, b"")
OPENMETRICS = ExpositionFormat(generate_openmetrics, OPENMETRICS_TYPE, OPENMETRICS_EOF)


# Only so much of a header is read: a scraper's Accept is a few ranges, not thousands.
MAX_NEGOTIATED_HEADER_CHARACTERS = 4096
MAX_NEGOTIATED_RANGES = 32


def _qualities(header: str) -> dict[str, float]:
    """Each listed value (lower-cased, parameters but q dropped) with its q, as RFC 9110 reads
    `Accept` and `Accept-Encoding`; a q that is not a number counts as 0 (not acceptable)."""
    qualities: dict[str, float] = {}
    for part in header[:MAX_NEGOTIATED_HEADER_CHARACTERS].split(",")[:MAX_NEGOTIATED_RANGES]:
        value, *parameters = part.split(";")
        quality = 1.0
        for parameter in parameters:
            name, _, text = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = min(1.0, max(0.0, float(text.strip())))
                except ValueError:
                    quality = 0.0
                quality = quality if quality == quality else 0.0  # NaN
        value = value.strip().lower()
        if value:
            qualities[value] = max(quality, qualities.get(value, 0.0))
    return qualities


def _quality_of(qualities: dict[str, float], *names: str) -> float:
    """The q of the first of `names` listed (the most specific first), else 0."""
    return next((qualities[name] for name in names if name in qualities), 0.0)


def choose_format(accept: str) -> ExpositionFormat:
    """OpenMetrics when the scraper names it and prefers it at least as much as the text format
    (Prometheus does); the text format otherwise: for a wildcard (curl's */*), and also when
    nothing we speak is acceptable."""
    qualities = _qualities(accept)
    openmetrics = _quality_of(qualities, "application/openmetrics-text")
    text = _quality_of(qualities, "text/plain", "text/*", "*/*")
    return OPENMETRICS if openmetrics > 0 and openmetrics >= text else TEXT


def accepts_gzip(accept_encoding: str) -> bool:
    qualities = _qualities(accept_encoding)
    return _quality_of(qualities, "gzip", "x-gzip", "*") > 0


@dataclass(frozen=True)
class Exposition:
    body: bytes
    content_type: str
    content_encoding: str | None


def _gzip_member(data: bytes) -> bytes:
    # mtime=0 keeps members byte-stable, so equal text gives equal bytes.
    return gzip.compress(data, compresslevel=GZIP_LEVEL, mtime=0) if data else b""


@dataclass
class _Fragments:
    """One account's samples per family, as text and as a gzip member."""

    snapshot: AccountSnapshot
    text: list[bytes]
    gzipped: list[bytes]


@dataclass
class _FormatCache:
    exposition_format: ExpositionFormat
    headers: list[bytes] = field(default_factory=list)
    headers_gzipped: list[bytes] = field(default_factory=list)
    accounts: dict[str, _Fragments] = field(default_factory=dict)
    # Which accounts, in which order, the bodies below are for (None before the first refresh).
    order: tuple[str, ...] | None = None
    # The account part of the body, plain and gzipped; each joined only when a scrape asks for
    # it (None: to be joined again).
    body: bytes | None = None
    body_gzipped: bytes | None = None


class ExpositionCache:
    """Keeps the per-account part of /metrics rendered; see the module's docstring."""

    def __init__(self, store: BalanceStore, process_metrics: bool = True) -> None:
        self.store = store
        self.counters = ExporterCounters()
        self._caches = {TEXT.content_type: _FormatCache(TEXT),
                        OPENMETRICS.content_type: _FormatCache(OPENMETRICS)}
        self._tail = CollectorRegistry(auto_describe=False)
        self._tail.register(_TailCollector(self))
        if process_metrics:
            register_process_collectors(self._tail)
        self._lock = asyncio.Lock()

    async def render(self, accept: str, accept_encoding: str) -> Exposition:
        exposition_format = choose_format(accept)
        cache = self._caches[exposition_format.content_type]
        gzipped = accepts_gzip(accept_encoding)
        async with self._lock:  # two scrapes at once render each account once
            await self._refresh(cache)
            body = self._body(cache, gzipped)
        tail = exposition_format.encode(self._tail)
        if gzipped:
            return Exposition(body + _gzip_member(tail), exposition_format.content_type, "gzip")
        return Exposition(body + tail, exposition_format.content_type, None)

    async def _refresh(self, cache: _FormatCache) -> None:
        snapshots = self.store.account_snapshots()
        if not cache.headers:
            self._render_headers(cache)
        # Snapshots are immutable and replaced on every update: identity says "unchanged".
        dirty = [snapshot for snapshot in snapshots
                 if (known := cache.accounts.get(snapshot.target.label)) is None
                 or known.snapshot is not snapshot]
        order = tuple(snapshot.target.label for snapshot in snapshots)
        if not dirty and order == cache.order:
            return
        for start in range(0, len(dirty), ACCOUNTS_PER_BATCH):
            for snapshot in dirty[start:start + ACCOUNTS_PER_BATCH]:
                self._render_account(cache, snapshot)
            if start + ACCOUNTS_PER_BATCH < len(dirty):
                await asyncio.sleep(0)  # let pollers and other requests run between batches
        for label in set(cache.accounts) - set(order):
            del cache.accounts[label]
        cache.order = order
        cache.body = cache.body_gzipped = None

    def _render_headers(self, cache: _FormatCache) -> None:
        rendered = cache.exposition_format.encode(_Families(account_families(())))
        cache.headers = [header for header, _ in cache.exposition_format.split(rendered)]
        cache.headers_gzipped = [_gzip_member(header) for header in cache.headers]

    def _render_account(self, cache: _FormatCache, snapshot: AccountSnapshot) -> None:
        label = snapshot.target.label
        try:
            rendered = cache.exposition_format.encode(_Families(account_families((snapshot,))))
            samples = [sample_lines for _, sample_lines in cache.exposition_format.split(rendered)]
            if len(samples) != len(cache.headers):
                raise ValueError(f"{len(samples)} families rendered, {len(cache.headers)} known")
        except Exception:
            # Never into the scrape: keep what was rendered before (or nothing), and count it.
            self.counters.collect_errors += 1
            log.exception("rendering an account failed", account=label)
            if label not in cache.accounts:
                cache.accounts[label] = _Fragments(snapshot, [b""] * len(cache.headers),
                                                   [b""] * len(cache.headers))
            return
        cache.accounts[label] = _Fragments(snapshot, samples,
                                           [_gzip_member(text) for text in samples])

    @staticmethod
    def _body(cache: _FormatCache, gzipped: bool) -> bytes:
        """The account part of the body, joined again only after a change."""
        body = cache.body_gzipped if gzipped else cache.body
        if body is None:
            accounts = [cache.accounts[label] for label in cache.order or ()]
            headers = cache.headers_gzipped if gzipped else cache.headers
            pieces: list[bytes] = []
            for index, header in enumerate(headers):
                pieces.append(header)
                pieces.extend(
                    (fragments.gzipped if gzipped else fragments.text)[index]
                    for fragments in accounts)
            body = b"".join(pieces)
            if gzipped:
                cache.body_gzipped = body
            else:
                cache.body = body
        return body


class _TailCollector(Collector):
    def __init__(self, cache: ExpositionCache) -> None:
        self._cache = cache

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        return exporter_families(self._cache.store, self._cache.counters)
