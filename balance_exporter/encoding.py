"""Sample lines of metric families, byte for byte as prometheus_client writes them, faster.

prometheus_client's encoders check every character of every label value for UTF-8 names, so an
account of 200 series takes milliseconds to render, and a change of one account held the event
loop that long. For the samples the exporter makes (legacy metric names without colons, legacy
label names; no timestamps, exemplars, native histograms or `_created` samples) a sample line
is the same in the text format and in OpenMetrics: `name{label="value",...} value`, labels
sorted by name, values escaped for backslash, newline and double quote, the value as Go prints
it. So the lines are written once here and serve both formats; only the families' HELP and TYPE
lines differ, and those are still rendered by prometheus_client. Anything else is refused with
an error naming it, never written differently: tests hold this module to prometheus_client's
output over arbitrary names, label values and numbers.
"""

import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import cast

from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

# The library's own: a value is written exactly as it writes it (prometheus_client has no hints).
_go_float = cast(Callable[[float], str], floatToGoString)
# Legacy names without colons: prometheus_client's OpenMetrics encoder writes a colon of a
# sample's name as an underscore (not so its text encoder), so the lines would differ.
_METRIC_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_LEGACY_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Samples the text format moves out of their family into a gauge family of their own.
_MOVED_SUFFIXES = ("_created", "_gsum", "_gcount")


class UnsupportedSample(ValueError):
    """A sample whose lines would differ between the formats, or from prometheus_client's."""


@lru_cache(maxsize=1024)  # the exporter's few (sample name, label names) pairs
def _line_template(family_name: str, name: str, label_names: tuple[str, ...]
                   ) -> tuple[str, tuple[str, ...]]:
    """A `str.format` template of the sample's line (label values, then the value) and the
    label names in its order: sorted, as prometheus_client writes them."""
    if not _METRIC_NAME.fullmatch(name):
        raise UnsupportedSample(f"metric name {name!r} is not a legacy Prometheus name without "
                                "colons")
    if name.removeprefix(family_name) in _MOVED_SUFFIXES:
        raise UnsupportedSample(f"sample {name!r} is rendered apart from its family")
    for label in label_names:
        if not _LEGACY_LABEL_NAME.fullmatch(label) or label.startswith("__"):
            raise UnsupportedSample(f"label name {label!r} is not a legacy Prometheus name")
    ordered = tuple(sorted(label_names))
    if not ordered:
        return name + " {}\n", ordered
    pairs = ",".join(label + '="{}"' for label in ordered)
    return name + "{{" + pairs + "}} {}\n", ordered


def _escaped(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def gauge_lines(name: str, label_names: tuple[str, ...],
                samples: Iterable[tuple[Sequence[str], float]]) -> bytes:
    """The lines `sample_lines` writes for a gauge family `name` of these samples (label values
    in the order of `label_names`), without the family."""
    template, ordered = _line_template(name, name, label_names)
    where = [label_names.index(label) for label in ordered]
    return "".join([template.format(*[_escaped(values[index]) for index in where],
                                    _go_float(value))
                    for values, value in samples]).encode()


def sample_lines(family: Metric) -> bytes:
    """The family's sample lines (without its HELP and TYPE lines), as both formats write them."""
    lines: list[str] = []
    for name, labels, value, timestamp, exemplar, native_histogram in family.samples:
        if timestamp is not None or exemplar is not None or native_histogram is not None:
            raise UnsupportedSample(f"sample {name!r} has a timestamp, exemplar or histogram")
        template, ordered = _line_template(family.name, name, tuple(labels))
        lines.append(template.format(*[_escaped(labels[label]) for label in ordered],
                                     _go_float(value)))
    return "".join(lines).encode()
