"""The /metrics body, kept rendered between scrapes so that a scrape costs a copy, not a render.

prometheus_client renders about 100k series a second and blocks the event loop (and so every
poller) while it does. Here each account's sample lines are written once per change of that
account, by `encoding` (held byte for byte to prometheus_client), and serve both formats: only
the families' HELP and TYPE lines differ between them, and those are rendered once per format
by prometheus_client itself. The lines are kept per (account, family), with a gzip member of
each: concatenated gzip members are a valid gzip stream, so a gzipped body is assembled without
compressing anything that did not change. The members come from one compressor kept warm (a
fresh one costs 50 microseconds to set up, five times an account's family), a full flush ending
each. Changed accounts are rendered in the background as
the pollers change them (`start`), in slices of a few milliseconds that give the event loop a
turn between them, so a scrape finds at most an account or two to render. What is not per
account (keys, build, process metrics) is small, and rendered again for a scrape when a key's or
the exporter's counters changed, or when it is more than a second old (process metrics: an HA
pair scraping at once shares them).

A member per (account, family) compresses poorly: each has its own header and no history, and
a body of them is about three times one gzip stream of the same text. So the members are
compacted: per family, one member for each group of GROUP_ACCOUNTS consecutive accounts (a
part). A part whose accounts' lines of its family change is made again from the accounts' own
members at once, so a change costs no compression beyond the changed account's, and compacted
again by a background pass (not by the scrape, whose reply is still being written): on the event
loop when it is small, in a thread when it is large. After each round of compaction the next
waits long enough for compaction to take at most COMPACTION_SHARE of the time: at a production
rate the rounds are small and come every pass (the body stays compact), while at 500 polls a
second every part changes every few tens of milliseconds, and compacting them at every pass
took a third of the exporter's CPU. A poll that moved no balance
changes a few families of a line per account; the families of the balances keep their
compacted parts. The parts are kept in the body's order, so a gzipped body is one join of
slices of them and a scrape after a change costs the changed account's rendering and a copy.
"""

import asyncio
import contextlib
import gzip
import itertools
import math
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass, field

import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import Collector

from balance_exporter.encoding import gauge_lines, sample_lines
from balance_exporter.metrics import (
    ACCOUNT_FAMILY_GROUPS,
    ExporterCounters,
    account_families,
    exporter_families,
    register_process_collectors,
)
from balance_exporter.slices import Slices
from balance_exporter.store import AccountSnapshot, BalanceStore

log = structlog.get_logger("balance_exporter.exposition")

TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_EOF = b"# EOF\n"
# Dirty accounts are rendered for this long before the event loop gets a turn: a slice blocks
# it for this plus one account's rendering (a millisecond or two for 200 series). Short, because
# in one turn the loop may also run a poll, a scrape's reply and a compaction step.
RENDER_SLICE_SECONDS = 0.002
# How long after a change the accounts changed meanwhile are rendered, all at once, between
# scrapes: at a production rate (1,000 accounts polled every 30 s) a scrape then finds an account
# or two left to render. Nothing changed, no pass: an idle exporter does not wake.
BACKGROUND_RENDER_SECONDS = 0.05
# A scrape renders at most this many changed accounts itself. With more (the pollers are ahead
# of the background pass, the process is saturated) it is answered at once with the body the last
# pass made, so that it never waits for the pollers' work: polling falls behind instead, in the
# open (fewer polls than planned, GeminiBalancePollingBehind; the data's age).
SCRAPE_RENDER_ACCOUNTS = 8
# A body (a format, gzipped or not) scraped within this long is made again by every background
# pass, for such a scrape to find.
PUBLISH_SECONDS = 300.0
# Parts of at most this much text are compressed on the event loop (a tenth of a millisecond or
# so: families of a line an account, which every poll changes); larger ones in a thread.
INLINE_COMPACTION_BYTES = 16 * 1024
GZIP_LEVEL = 6
# The most of the time compaction may take: a round that took t waits t * (1 / share - 1).
COMPACTION_SHARE = 0.05
# A gzip member's header (deflate, no name, no time, unknown system) and the deflate stream's
# end: an empty final block with fixed codes.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_FINAL_BLOCK = b"\x03\x00"
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


def _groups_of(accounts: int) -> int:
    """How many groups of GROUP_ACCOUNTS consecutive accounts `accounts` accounts make."""
    return math.ceil(accounts / GROUP_ACCOUNTS)


def _gzip_members(texts: list[list[bytes]]) -> tuple[bytes, ...]:
    """One member per family of a group's texts (run in a thread: zlib lets go of the GIL)."""
    return tuple(_gzip_member(b"".join(family)) for family in texts)


class _Members:
    """Gzip members of texts, from one compressor kept warm: a full flush ends each text's
    deflate segment and forgets what came before, so the segment, a final empty block and the
    text's CRC make a member of its own (gzip.compress sets up a compressor for each, five times
    the cost of compressing an account's family)."""

    def __init__(self) -> None:
        self._compressor = self._fresh()

    @staticmethod
    def _fresh() -> "zlib._Compress":
        return zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)

    def of(self, text: bytes) -> bytes:
        if not text:
            return b""
        try:
            deflated = self._compressor.compress(text) + self._compressor.flush(
                zlib.Z_FULL_FLUSH)
        except BaseException:
            # Part of the text may still be in the compressor: the next member would carry it.
            self._compressor = self._fresh()
            raise
        return b"".join([_GZIP_HEADER, deflated, _FINAL_BLOCK,
                         struct.pack("<II", zlib.crc32(text), len(text) & 0xFFFFFFFF)])


@dataclass(frozen=True, slots=True)
class _Fragments:
    """One account's sample lines per family, as text and as a gzip member (both formats')."""

    snapshot: AccountSnapshot
    # Tuples, not lists: a tuple of bytes is left out of the cyclic garbage collector's walks.
    text: tuple[bytes, ...]
    gzipped: tuple[bytes, ...]
    # Made whole from `snapshot` (not kept from before a render that failed): only then may a
    # family group whose parts did not change keep its lines.
    complete: bool = True


@dataclass
class _FormatCache:
    """What differs between the formats: the families' HELP and TYPE lines, the tail, and the
    bodies they make with the accounts' lines."""

    exposition_format: ExpositionFormat
    headers: list[bytes]
    headers_gzipped: list[bytes]
    # What the tail was rendered from (when, monotonic; the keys' version; the exporter's
    # counters), and it as text and as a gzip member.
    tail: tuple[tuple[float, int, tuple[int, ...]], bytes, bytes] | None = None
    # The whole body, gzipped (True) or not, and the tail it ends with: joined again when the
    # accounts' part changed (the entry is dropped) or the tail did (another tail).
    bodies: dict[bool, tuple[bytes, bytes]] = field(default_factory=dict)

    @classmethod
    def of(cls, exposition_format: ExpositionFormat) -> "_FormatCache":
        rendered = exposition_format.encode(_Families(account_families(())))
        headers = [header for header, _ in exposition_format.split(rendered)]
        return cls(exposition_format, headers, [_gzip_member(header) for header in headers])


class ExpositionCache:
    """Keeps the per-account part of /metrics rendered; see the module's docstring."""

    def __init__(self, store: BalanceStore, process_metrics: bool = True) -> None:
        self.store = store
        self.counters = ExporterCounters()
        self._formats = {exposition_format.content_type: _FormatCache.of(exposition_format)
                         for exposition_format in (TEXT, OPENMETRICS)}
        self._family_count = len(self._formats[TEXT.content_type].headers)
        # Where each family group's families are among an account's.
        ends = list(itertools.accumulate(len(list(group.families(())))
                                         for group in ACCOUNT_FAMILY_GROUPS))
        self._group_slices = [slice(start, end) for start, end in zip([0, *ends], ends,
                                                                      strict=False)]
        self._accounts: dict[str, _Fragments] = {}
        # Per family, its part of each group (GROUP_ACCOUNTS consecutive accounts of `_order`),
        # in the body's order (`_slot`): a list, so that a body is joined from slices of it. A
        # part is one family's gzip members for a group: one compacted member, or the accounts'
        # own members one after another. When one of its accounts' lines of the family change,
        # the part is made again (its slot is `_unmade` until then) from the accounts' members.
        self._parts: list[bytes] = []
        self._unmade: set[int] = set()
        # Moves on whenever a part is compacted: a body joined across that is not kept.
        self._compactions = 0
        # Which accounts, in which order, the bodies are for (None before the first refresh),
        # and the store's accounts_version they were last checked against.
        self._order: tuple[str, ...] | None = None
        self._positions: dict[str, int] = {}
        self._store_version = -1
        # (group, family) of the parts not compacted since their lines changed.
        self._stale: set[tuple[int, int]] = set()
        # When the last round of compaction ended (monotonic), and how long its compression
        # took: the next waits for COMPACTION_SHARE.
        self._last_round: tuple[float, float] = (0.0, 0.0)
        self._members = _Members()
        self._compacting: asyncio.Task[None] | None = None
        # Compacting is only worth it once a scraper asked for gzip.
        self._gzip_asked = False
        self._rendering: asyncio.Task[None] | None = None
        # With the background pass: the last body made of each (content type, gzipped), and
        # when each was last scraped.
        self._published: dict[tuple[str, bool], bytes] = {}
        self._scraped: dict[tuple[str, bool], float] = {}
        self._tail = CollectorRegistry(auto_describe=False)
        self._tail.register(_TailCollector(self))
        if process_metrics:
            register_process_collectors(self._tail)
        self._lock = asyncio.Lock()

    def start(self) -> None:
        """Render changed accounts in the background from now on, BACKGROUND_RENDER_SECONDS
        after a change, so that a scrape finds them rendered (the pollers change hundreds of
        accounts between two scrapes), and make again the bodies scraped lately."""
        if self._rendering is None:
            self._rendering = asyncio.create_task(self._keep_rendered(), name="render-accounts")

    async def _keep_rendered(self) -> None:
        failing = False
        while True:
            # Wakes for a change only, or for parts left to compact once compaction may go on.
            compacting_later = self._gzip_asked and bool(self._stale)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self.store.changed.wait(),
                    max(0.0, self._next_round_at() - time.monotonic()) if compacting_later
                    else None)
            await asyncio.sleep(BACKGROUND_RENDER_SECONDS)
            self.store.changed.clear()
            try:
                async with self._lock:
                    slices = Slices(RENDER_SLICE_SECONDS)
                    await self._refresh(slices)
                    await self._publish(slices)
            except Exception:  # a bug: scrapes render on their own; counted, logged once a run
                self.counters.collect_errors += 1
                if not failing:
                    log.exception("rendering accounts in the background failed")
                failing = True
                continue
            failing = False
            if self._gzip_asked:
                self._start_compacting()

    async def render(self, accept: str, accept_encoding: str) -> Exposition:
        exposition_format = choose_format(accept)
        cache = self._formats[exposition_format.content_type]
        gzipped = accepts_gzip(accept_encoding)
        variant = (exposition_format.content_type, gzipped)
        published = self._published.get(variant)
        if self._rendering is not None:
            self._scraped[variant] = time.monotonic()
        if published is not None and self._behind():
            body = published
        else:
            async with self._lock:  # two scrapes at once render each account once
                slices = Slices(RENDER_SLICE_SECONDS)
                await self._refresh(slices)
                body = await self._joined(cache, gzipped, slices)
                if self._rendering is not None:
                    self._published[variant] = body
        if gzipped:
            self._gzip_asked = True
            if self._rendering is None:  # else the background pass compacts, after this reply
                self._start_compacting(every=True)
            return Exposition(body, exposition_format.content_type, "gzip")
        return Exposition(body, exposition_format.content_type, None)

    def _behind(self) -> bool:
        """Whether more accounts changed since the last render than a scrape renders itself
        (a new set of accounts, after a reload, is rendered by the scrape all the same)."""
        changed = self.store.changed_since(self._store_version)
        return changed is not None and len(changed) > SCRAPE_RENDER_ACCOUNTS

    async def _publish(self, slices: Slices) -> None:
        """Make again the bodies scraped lately (their tails within TAIL_MAX_AGE_SECONDS: the
        keys' counters move with every request)."""
        now = time.monotonic()
        for (content_type, gzipped), scraped in list(self._scraped.items()):
            if now - scraped <= PUBLISH_SECONDS:
                self._published[content_type, gzipped] = await self._joined(
                    self._formats[content_type], gzipped, slices, exact_tail=False)

    async def _joined(self, cache: _FormatCache, gzipped: bool, slices: Slices,
                      exact_tail: bool = True) -> bytes:
        """The whole body, from the rendered accounts and the tail."""
        text_tail, gzipped_tail = self._tail_of(cache, exact_tail)
        tail = gzipped_tail if gzipped else text_tail
        known = cache.bodies.get(gzipped)
        if known is not None and known[0] is tail:
            return known[1]
        compactions = self._compactions
        body = await (self._gzipped_body(cache, tail, slices) if gzipped
                      else self._text_body(cache, tail, slices))
        if compactions == self._compactions:  # else compacted meanwhile: join again
            cache.bodies[gzipped] = (tail, body)
        return body

    def _tail_of(self, cache: _FormatCache, exact: bool = True) -> tuple[bytes, bytes]:
        """The tail: rendered again when the keys' or the exporter's counters changed
        (`exact`), and when it is older than TAIL_MAX_AGE_SECONDS."""
        now = time.monotonic()
        source = (now, self.store.keys_version, astuple(self.counters))
        if (cache.tail is None or (exact and cache.tail[0][1:] != source[1:])
                or now - cache.tail[0][0] > TAIL_MAX_AGE_SECONDS):
            tail = cache.exposition_format.encode(self._tail)
            cache.tail = (source, tail, _gzip_member(tail))
        return cache.tail[1], cache.tail[2]

    async def _refresh(self, slices: Slices) -> None:
        if self._store_version == self.store.accounts_version:
            return  # nothing changed since: no need to look at any account
        version = self.store.accounts_version
        changed = self.store.changed_since(self._store_version)
        if changed is not None:
            order = self._order
            candidates = changed
        else:  # which accounts there are may have changed: look at every one
            candidates = self.store.account_snapshots()
            order = tuple(snapshot.target.label for snapshot in candidates)
        # Snapshots are immutable and replaced on every update: identity says "unchanged".
        dirty = [snapshot for snapshot in candidates
                 if (known := self._accounts.get(snapshot.target.label)) is None
                 or known.snapshot is not snapshot]
        if not dirty and order == self._order:
            self._store_version = version
            return
        if order != self._order:
            slots = _groups_of(len(order or ())) * self._family_count
            self._parts = [b""] * slots  # other accounts in each group now
            self._unmade = set(range(slots))
            self._positions = {label: position for position, label in enumerate(order or ())}
            self._stale = {(index, family)
                           for index in range(_groups_of(len(order or ())))
                           for family in range(self._family_count)}
            for label in set(self._accounts) - set(self._positions):
                del self._accounts[label]
            # Before any account is rendered: its part's slot is counted in the new groups.
            self._order = order
        for snapshot in dirty:
            self._render_account(snapshot)
            await slices.pause_if_due()
        for cache in self._formats.values():
            cache.bodies.clear()
        # The snapshots taken at `version` are rendered; a change while rendering moved the
        # version on, so the next scrape looks again.
        self._store_version = version

    def _group_count(self) -> int:
        return _groups_of(len(self._order or ()))

    def _group_accounts(self, index: int) -> list[_Fragments]:
        start = index * GROUP_ACCOUNTS
        return [self._accounts[label]
                for label in (self._order or ())[start:start + GROUP_ACCOUNTS]]

    def _slot(self, index: int, family: int) -> int:
        return family * self._group_count() + index

    def _part(self, index: int, family: int) -> bytes:
        slot = self._slot(index, family)
        if slot in self._unmade:
            self._parts[slot] = b"".join(
                [fragments.gzipped[family] for fragments in self._group_accounts(index)])
            self._unmade.discard(slot)
        return self._parts[slot]

    async def _make_parts(self, slices: Slices) -> None:
        """Every part a change left unmade: all of them after the first render or a change of
        which accounts there are (tens of milliseconds at 1,000 accounts), so in slices."""
        groups = self._group_count()
        for slot in sorted(self._unmade):
            self._part(slot % groups, slot // groups)
            await slices.pause_if_due()

    def _replace_part(self, index: int, family: int, compacted: bytes | None = None) -> None:
        """The group's part of the family changed: its accounts' lines did (`compacted` None),
        or it was compacted."""
        if compacted is None:
            self._unmade.add(self._slot(index, family))
            self._stale.add((index, family))
        else:
            self._parts[self._slot(index, family)] = compacted
            self._stale.discard((index, family))
            self._compactions += 1

    def _next_round_at(self) -> float:
        ended, took = self._last_round
        return ended + took * (1 / COMPACTION_SHARE - 1)

    def _due(self, every: bool) -> list[tuple[int, int]]:
        """The stale parts to compact: all of them once compaction may go on (`_next_round_at`),
        or `every`; none before."""
        if not every and time.monotonic() < self._next_round_at():
            return []
        return sorted(self._stale)

    def _start_compacting(self, every: bool = False) -> None:
        if (self._compacting is None or self._compacting.done()) and self._due(every):
            self._compacting = asyncio.create_task(self._compact(every), name="compact-gzip")

    async def compacted(self) -> None:
        """Compact every stale part now, and wait until it is done (for tests and benchmarks);
        a compaction that fails ends it."""
        errors = self.counters.collect_errors
        while True:
            if self._compacting is not None and not self._compacting.done():
                await asyncio.shield(self._compacting)
            if self.counters.collect_errors != errors:
                return
            self._start_compacting(every=True)
            if self._compacting is None or self._compacting.done():
                return  # nothing is stale

    async def close(self) -> None:
        tasks = [task for task in (self._compacting, self._rendering) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _compact(self, every: bool) -> None:
        """Compress the parts due (`_due`): small ones on the event loop, large ones a group at
        a time in a thread. A part whose lines changed meanwhile stays stale. The time the
        compression took sets when the next round may come."""
        took = 0.0
        try:
            slices = Slices(RENDER_SLICE_SECONDS)
            groups: dict[int, list[int]] = {}
            for index, family in self._due(every):
                groups.setdefault(index, []).append(family)
            for index, families in groups.items():
                members: dict[int, bytes] = {}
                async with self._lock:  # the accounts as a scrape sees them
                    if index >= self._group_count():
                        continue  # fewer accounts now: the stale set was made anew
                    accounts = self._group_accounts(index)
                    parts = [(family, self._part(index, family)) for family in families]
                    large: list[tuple[int, list[bytes]]] = []
                    started = time.perf_counter()
                    for family in families:
                        text = [fragments.text[family] for fragments in accounts]
                        if sum(map(len, text)) <= INLINE_COMPACTION_BYTES:
                            members[family] = _gzip_member(b"".join(text))
                        else:
                            large.append((family, text))
                    took += time.perf_counter() - started
                if large:
                    started = time.perf_counter()
                    compressed = await asyncio.to_thread(
                        _gzip_members, [text for _, text in large])
                    took += time.perf_counter() - started
                    members.update(zip([family for family, _ in large], compressed,
                                       strict=True))
                # Under the lock again: a render may be half-way through a new set of
                # accounts, whose parts cannot be looked at until it is done.
                async with self._lock:
                    for family, part in parts:
                        if index >= self._group_count():
                            continue
                        # Equal members hold equal lines, so the compacted member is right for
                        # a part made again alike.
                        if self._part(index, family) == part:  # else it changed meanwhile
                            self._replace_part(index, family, compacted=members[family])
                for cache in self._formats.values():
                    cache.bodies.pop(True, None)
                await slices.pause_if_due()
        except Exception:  # the accounts' members keep serving; never a crash of the loop
            self.counters.collect_errors += 1
            log.exception("compacting the gzip body failed")
        finally:
            self._last_round = (time.monotonic(), took)

    def _account_texts(self, snapshot: AccountSnapshot,
                        previous: _Fragments | None) -> tuple[bytes, ...]:
        """The account's lines per family: those of `previous` for each group whose parts did
        not change, made anew for the others."""
        texts: list[bytes] = []
        for group, where in zip(ACCOUNT_FAMILY_GROUPS, self._group_slices, strict=True):
            if previous is not None and previous.complete and (
                    group.parts(previous.snapshot) == group.parts(snapshot)):
                texts.extend(previous.text[where])
            elif group.gauges is not None:  # the same lines, without making the families
                texts.extend(gauge_lines(gauge.name, gauge.label_names, gauge.samples)
                             for gauge in group.gauges((snapshot,)))
            else:
                texts.extend(sample_lines(family) for family in group.families((snapshot,)))
        return tuple(texts)

    def _render_account(self, snapshot: AccountSnapshot) -> None:
        label = snapshot.target.label
        nothing = (b"",) * self._family_count
        known = self._accounts.get(label)
        previous = known or _Fragments(snapshot, nothing, nothing, complete=False)
        try:
            texts = self._account_texts(snapshot, known)
            if len(texts) != self._family_count:
                raise ValueError(f"{len(texts)} families rendered, {self._family_count} known")
        except Exception:
            # Never into the scrape: keep what was rendered before (or nothing), and count it.
            self.counters.collect_errors += 1
            log.exception("rendering an account failed", account=label)
            self._accounts.setdefault(label, previous)
            return
        # A family whose lines are what they were keeps its member, and its group's part: a
        # poll that moved no balance changes a few one-line families only.
        unchanged = [text == old for text, old in zip(texts, previous.text, strict=True)]
        self._accounts[label] = _Fragments(
            snapshot,
            tuple(old if same else text
                  for text, old, same in zip(texts, previous.text, unchanged, strict=True)),
            tuple(old if same else self._members.of(text)
                  for text, old, same in zip(texts, previous.gzipped, unchanged, strict=True)))
        position = self._positions.get(label)
        if position is not None:
            for family, same in enumerate(unchanged):
                if not same:
                    self._replace_part(position // GROUP_ACCOUNTS, family)

    async def _gzipped_body(self, cache: _FormatCache, tail: bytes, slices: Slices) -> bytes:
        await self._make_parts(slices)
        groups = self._group_count()
        pieces: list[bytes] = []
        for family, header in enumerate(cache.headers_gzipped):
            pieces.append(header)
            pieces.extend(self._parts[family * groups:(family + 1) * groups])
        pieces.append(tail)
        return b"".join(pieces)

    async def _text_body(self, cache: _FormatCache, tail: bytes, slices: Slices) -> bytes:
        accounts = [self._accounts[label] for label in self._order or ()]
        # The families' lines per account, from the accounts' lines per family.
        columns = tuple(zip(*(fragments.text for fragments in accounts), strict=True))
        pieces: list[bytes] = []
        for family, header in enumerate(cache.headers):
            pieces.append(header)
            if columns:
                pieces.append(b"".join(columns[family]))
            await slices.pause_if_due()
        pieces.append(tail)
        return b"".join(pieces)


class _TailCollector(Collector):
    def __init__(self, cache: ExpositionCache) -> None:
        self._cache = cache

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        return exporter_families(self._cache.store, self._cache.counters)
