"""The sample-line encoder against its oracle: whatever names, label values and numbers a family
holds, its lines are byte for byte what prometheus_client writes in the text format and in
OpenMetrics, or it is refused with an error naming what it cannot write."""

import gzip
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.samples import Exemplar, Sample

from balance_exporter import exposition
from balance_exporter.encoding import UnsupportedSample, gauge_lines, sample_lines
from balance_exporter.gemini.replies import BalanceReply, CurrencyBalance
from balance_exporter.store import BalanceStore
from balance_exporter.targets import AccountTarget, Endpoint
from tests.helpers import OPENMETRICS_ACCEPT, reference_body


class OneFamily:
    def __init__(self, family: Metric) -> None:
        self._family = family

    def collect(self) -> list[Metric]:
        return [self._family]


def library_sample_lines(family: Metric, openmetrics: bool) -> bytes:
    """The lines prometheus_client writes for the family's samples, in one format."""
    encode = generate_openmetrics if openmetrics else generate_latest
    rendered: bytes = encode(OneFamily(family))
    return b"".join(line for line in rendered.splitlines(keepends=True)
                    if not line.startswith(b"#"))


metric_names = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,24}", fullmatch=True)
label_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,12}", fullmatch=True).filter(
    lambda name: not name.startswith("__"))
# Any text a label value may hold, the characters that are escaped most of all.
label_values = st.text(st.characters(codec="utf-8") | st.sampled_from('\\"\n{},= '),
                       max_size=12)
numbers = (st.floats(allow_nan=True, allow_infinity=True)
           | st.integers(min_value=-(2**63), max_value=2**63)
           | st.sampled_from([0.0, -0.0, 1e6, 1234567.0, 12345678.5, 1e21, 1e-7, 5e-324]))


@st.composite
def families(draw: st.DrawFn) -> Metric:
    name = draw(metric_names)
    names = draw(st.lists(label_names, unique=True, max_size=4))
    kind = draw(st.sampled_from(["gauge", "counter", "info"]))
    samples = st.lists(st.tuples(st.lists(label_values, min_size=len(names),
                                          max_size=len(names)), numbers), max_size=6)
    if kind == "info":
        info = InfoMetricFamily(name, "help", labels=names[:-1])
        for values, _ in draw(samples):
            info.add_metric(values[:-1], {names[-1]: values[-1]} if names else {})
        return info
    family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
        name, "help", labels=names)
    for values, value in draw(samples):
        family.add_metric(values, abs(value) if kind == "counter" else value)
    return family


@settings(max_examples=400)
@given(families())
def test_lines_are_prometheus_clients_in_both_formats(family: Metric) -> None:
    if ":" in family.name and family.samples:
        # The library's OpenMetrics encoder writes a sample name's colon as "_", its text
        # encoder does not: no one line is both.
        with pytest.raises(UnsupportedSample, match="colons"):
            sample_lines(family)
        return
    lines = sample_lines(family)
    assert lines == library_sample_lines(family, openmetrics=False)
    assert lines == library_sample_lines(family, openmetrics=True)


@settings(max_examples=300)
@given(metric_names.filter(lambda name: ":" not in name),
       st.lists(label_names, unique=True, max_size=4).flatmap(lambda names: st.tuples(
           st.just(tuple(names)),
           st.lists(st.tuples(st.lists(label_values, min_size=len(names), max_size=len(names)),
                              numbers), max_size=6))))
def test_gauge_lines_are_the_lines_of_the_gauge_family_they_stand_for(
    name: str, gauge: tuple[tuple[str, ...], list[tuple[list[str], float]]],
) -> None:
    names, samples = gauge
    family = GaugeMetricFamily(name, "help", labels=names)
    for values, value in samples:
        family.add_metric(values, value)
    assert gauge_lines(name, names, samples) == library_sample_lines(family, openmetrics=False)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 7, 0.1, 123456789.0, -1e300])
def test_special_and_large_values_are_written_as_go_writes_them(value: float) -> None:
    gauge = GaugeMetricFamily("g", "help", labels=["a"])
    gauge.add_metric(["x"], value)
    assert sample_lines(gauge) == library_sample_lines(gauge, openmetrics=False)


def with_sample(sample: Sample) -> Metric:
    family = Metric("gemini_test", "help", "counter")
    family.samples.append(sample)
    return family


@pytest.mark.parametrize(("family", "named"), [
    (with_sample(Sample("gemini_test_total", {}, 1.0, timestamp=1.0)), "timestamp"),
    (with_sample(Sample("gemini_test_total", {}, 1.0,
                        exemplar=Exemplar({"trace": "1"}, 1.0))), "exemplar"),
    # The text format moves _created samples out of their family.
    (with_sample(Sample("gemini_test_created", {}, 1.0)), "gemini_test_created"),
    (with_sample(Sample("gemini.test_total", {}, 1.0)), "gemini.test_total"),
    (with_sample(Sample("gemini_test_total", {"dotted.name": "x"}, 1.0)), "dotted.name"),
    (with_sample(Sample("gemini_test_total", {"__reserved": "x"}, 1.0)), "__reserved"),
], ids=["timestamp", "exemplar", "created", "utf8-metric-name", "utf8-label-name", "reserved"])
def test_what_it_cannot_write_alike_is_refused_by_name(family: Metric, named: str) -> None:
    with pytest.raises(UnsupportedSample, match=named):
        sample_lines(family)


currencies = st.text(st.characters(codec="utf-8") | st.sampled_from('\\"\n'), min_size=1,
                     max_size=10)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(currencies, numbers), min_size=1, max_size=5,
                unique_by=lambda row: row[0]),
       st.booleans(), st.booleans())
async def test_the_whole_body_is_prometheus_clients_for_any_rows(
    rows: list[tuple[str, float]], openmetrics: bool, gzipped: bool,
) -> None:
    store = BalanceStore()
    store.configure([AccountTarget("main", "k", None, True, 30.0),
                     AccountTarget("other", "k", "o", False, 30.0)], ["k"])
    balances = tuple(CurrencyBalance(currency, value, value, value, value, value)
                     for currency, value in rows)
    for label in ("main", "other"):
        store.record_reply(label, Endpoint.BALANCES, BalanceReply(balances, None, None), 0.1,
                           1.0)
    cache = exposition.ExpositionCache(store, process_metrics=False)
    rendered = await cache.render(OPENMETRICS_ACCEPT if openmetrics else "",
                                  "gzip" if gzipped else "")
    body = gzip.decompress(rendered.body) if gzipped else rendered.body
    assert body == reference_body(store, openmetrics)
