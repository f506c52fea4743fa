"""The /metrics body, kept rendered between scrapes so that a scrape costs a copy, not a render.

prometheus_client renders about 100k series a second and blocks the event loop (and so every
poller) while it does. Here each account's samples are rendered once per change of that account,
by prometheus_client's own encoders on a collector of that one account, so the bytes are the
library's by construction. The text is kept per (account, family), together with a gzip member
of it: concatenated gzip members are a valid gzip stream, so a gzipped body is assembled without
compressing anything that did not change. Dirty accounts are rendered in small batches that
yield to the event loop between them. What is not per account (keys, build, process metrics) is
small, and rendered again for a scrape when a key's or the exporter's counters changed, or
when it is more than a second old (process metrics: an HA pair scraping at once shares them).

A member per (account, family) compresses poorly: each has its own header and no history, and
a body of them is about four times one gzip stream of the same text. So a background task
compacts them: per family, one member for each group of GROUP_ACCOUNTS consecutive accounts,
compressed in a thread. A scrape serves a group's member while none of its accounts changed
since it was compressed, and the accounts' own members otherwise, so a change costs a scrape no
compression beyond the changed account's, and the body goes back to its compact size as soon
as the group is compressed again.
"""

import asyncio
import gzip
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass, field

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
# Accounts per compacted gzip member: enough text per family for deflate's 32 KiB window to find
# its repeats, few enough that a group compresses in a few milliseconds.
GROUP_ACCOUNTS = 32
TAIL_MAX_AGE_SECONDS = 1.0


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


def _gzip_members(texts: list[list[bytes]]) -> list[bytes]:
    """One member per family of a group's texts (run in a thread: zlib lets go of the GIL)."""
    return [_gzip_member(b"".join(family)) for family in texts]


# Compared by identity: a group is current while its accounts have the very fragments it was
# compressed from.
@dataclass(eq=False)
class _Fragments:
    """One account's samples per family, as text and as a gzip member."""

    snapshot: AccountSnapshot
    text: list[bytes]
    gzipped: list[bytes]


@dataclass
class _Group:
    """One compacted member per family for some consecutive accounts, and the fragments it was
    compressed from (it is used only while the accounts still have exactly those)."""

    fragments: tuple[_Fragments, ...]
    gzipped: list[bytes]


@dataclass
class _FormatCache:
    exposition_format: ExpositionFormat
    headers: list[bytes] = field(default_factory=list)
    headers_gzipped: list[bytes] = field(default_factory=list)
    accounts: dict[str, _Fragments] = field(default_factory=dict)
    # Compacted members by the index of their group (GROUP_ACCOUNTS accounts of `order`).
    groups: dict[int, _Group] = field(default_factory=dict)
    # Which accounts, in which order, the bodies below are for (None before the first refresh),
    # and the store's accounts_version they were last checked against.
    order: tuple[str, ...] | None = None
    store_version: int = -1
    # The store_version every group was last found compacted at (no need to look again).
    compacted_version: int = -2
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
        self._compacting: dict[str, asyncio.Task[None]] = {}
        # Per content type: what the tail was rendered from (when, monotonic; the keys' version;
        # the exporter's counters), and it as text and as a gzip member.
        self._tails: dict[str, tuple[tuple[float, int, tuple[int, ...]], bytes, bytes]] = {}

    async def render(self, accept: str, accept_encoding: str) -> Exposition:
        exposition_format = choose_format(accept)
        cache = self._caches[exposition_format.content_type]
        gzipped = accepts_gzip(accept_encoding)
        async with self._lock:  # two scrapes at once render each account once
            await self._refresh(cache)
            body = self._body(cache, gzipped)
        if gzipped:
            self._start_compacting(exposition_format.content_type, cache)
        tail, tail_gzipped = self._tail_of(exposition_format)
        if gzipped:
            return Exposition(body + tail_gzipped, exposition_format.content_type, "gzip")
        return Exposition(body + tail, exposition_format.content_type, None)

    def _tail_of(self, exposition_format: ExpositionFormat) -> tuple[bytes, bytes]:
        now = time.monotonic()
        source = (now, self.store.keys_version, astuple(self.counters))
        rendered = self._tails.get(exposition_format.content_type)
        if (rendered is None or rendered[0][1:] != source[1:]
                or now - rendered[0][0] > TAIL_MAX_AGE_SECONDS):
            tail = exposition_format.encode(self._tail)
            rendered = self._tails[exposition_format.content_type] = (
                source, tail, _gzip_member(tail))
        return rendered[1], rendered[2]

    async def _refresh(self, cache: _FormatCache) -> None:
        if cache.store_version == self.store.accounts_version:
            return  # nothing changed since: no need to look at every account
        version = self.store.accounts_version
        snapshots = self.store.account_snapshots()
        if not cache.headers:
            self._render_headers(cache)
        # Snapshots are immutable and replaced on every update: identity says "unchanged".
        dirty = [snapshot for snapshot in snapshots
                 if (known := cache.accounts.get(snapshot.target.label)) is None
                 or known.snapshot is not snapshot]
        order = tuple(snapshot.target.label for snapshot in snapshots)
        if not dirty and order == cache.order:
            cache.store_version = version
            return
        for start in range(0, len(dirty), ACCOUNTS_PER_BATCH):
            for snapshot in dirty[start:start + ACCOUNTS_PER_BATCH]:
                self._render_account(cache, snapshot)
            if start + ACCOUNTS_PER_BATCH < len(dirty):
                await asyncio.sleep(0)  # let pollers and other requests run between batches
        for label in set(cache.accounts) - set(order):
            del cache.accounts[label]
        if order != cache.order:
            cache.groups.clear()  # other accounts in each group now
        cache.order = order
        cache.body = cache.body_gzipped = None
        # The snapshots taken at `version` are rendered; a change while rendering moved the
        # version on, so the next scrape looks again.
        cache.store_version = version

    def _start_compacting(self, content_type: str, cache: _FormatCache) -> None:
        if cache.compacted_version == cache.store_version:
            return
        running = self._compacting.get(content_type)
        if running is None or running.done():
            self._compacting[content_type] = asyncio.create_task(
                self._compact(cache), name=f"compact-gzip {content_type}")

    @staticmethod
    def _group_fragments(cache: _FormatCache, index: int) -> tuple[_Fragments, ...]:
        start = index * GROUP_ACCOUNTS
        return tuple(cache.accounts[label]
                     for label in (cache.order or ())[start:start + GROUP_ACCOUNTS])

    def _stale_groups(self, cache: _FormatCache) -> list[tuple[int, tuple[_Fragments, ...]]]:
        stale = []
        for index in range(math.ceil(len(cache.order or ()) / GROUP_ACCOUNTS)):
            fragments = self._group_fragments(cache, index)
            group = cache.groups.get(index)
            if group is None or group.fragments != fragments:
                stale.append((index, fragments))
        return stale

    async def compacted(self) -> None:
        """Wait until every gzip body asked for so far is in compacted members (for tests and
        benchmarks)."""
        for task in list(self._compacting.values()):
            await asyncio.shield(task)

    async def close(self) -> None:
        tasks = list(self._compacting.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _compact(self, cache: _FormatCache) -> None:
        """Compress every group whose accounts changed since, one group at a time in a thread;
        a group whose accounts changed meanwhile is left for the next round."""
        try:
            while True:
                version = cache.store_version
                stale = self._stale_groups(cache)
                if not stale:
                    cache.compacted_version = version
                    return
                for index, fragments in stale:
                    texts = [[fragment.text[family] for fragment in fragments]
                             for family in range(len(cache.headers))]
                    gzipped = await asyncio.to_thread(_gzip_members, texts)
                    if self._group_fragments(cache, index) == fragments:
                        cache.groups[index] = _Group(fragments, gzipped)
                        cache.body_gzipped = None
        except Exception:  # the per-account members keep serving; never a crash of the loop
            self.counters.collect_errors += 1
            log.exception("compacting the gzip body failed")


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
            order = cache.order or ()
            accounts = [cache.accounts[label] for label in order]
            pieces: list[bytes] = []
            if gzipped:
                # Per group: its compacted member while it still holds these accounts' text,
                # else each account's own member.
                parts: list[tuple[_Group | None, list[_Fragments]]] = []
                for index, start in enumerate(range(0, len(accounts), GROUP_ACCOUNTS)):
                    members = accounts[start:start + GROUP_ACCOUNTS]
                    group = cache.groups.get(index)
                    usable = group is not None and group.fragments == tuple(members)
                    parts.append((group if usable else None, members))
                for family, header in enumerate(cache.headers_gzipped):
                    pieces.append(header)
                    for group, members in parts:
                        if group is not None:
                            pieces.append(group.gzipped[family])
                        else:
                            pieces.extend(fragments.gzipped[family] for fragments in members)
                body = cache.body_gzipped = b"".join(pieces)
            else:
                for family, header in enumerate(cache.headers):
                    pieces.append(header)
                    pieces.extend(fragments.text[family] for fragments in accounts)
                body = cache.body = b"".join(pieces)
        return body


class _TailCollector(Collector):
    def __init__(self, cache: ExpositionCache) -> None:
        self._cache = cache

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        return exporter_families(self._cache.store, self._cache.counters)
