"""Counters, gauges and histograms rendered in the Prometheus text format, fast.

prometheus_client builds a dict and a namedtuple per sample at every scrape and
formats each label set again: with 100 job types x 10 queues (about 4,000
samples) that is tens of milliseconds of a worker's event loop per scrape.
Here every child keeps its sample-name prefixes (``name{a="x",b="y"}``), built
once when the label set first appears, so a scrape is string joins. Updates are
plain attribute arithmetic: every caller runs on the process's event loop (the
worker's flusher, the API's middleware), so no lock is taken.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Generic, TypeVar

INF = math.inf


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def fmt(value: float) -> str:
    """A sample value as Prometheus writes it (``1.0``, ``0.25``, ``+Inf``)."""
    if value == INF:
        return "+Inf"
    if value == -INF:
        return "-Inf"
    if value != value:
        return "NaN"
    return repr(float(value))


def label_text(names: Sequence[str], values: Sequence[str]) -> str:
    return ",".join(f'{n}="{escape_label(v)}"' for n, v in zip(names, values, strict=True))


class CounterChild:
    __slots__ = ("prefix", "value")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def render(self, out: list[str]) -> None:
        out.append(f"{self.prefix} {fmt(self.value)}")


class GaugeChild(CounterChild):
    __slots__ = ()

    def set(self, value: float) -> None:
        self.value = float(value)


class HistogramChild:
    __slots__ = ("bounds", "count_prefix", "counts", "prefixes", "sum", "sum_prefix", "total")

    def __init__(
        self, bounds: Sequence[float], prefixes: list[str], sum_prefix: str, count_prefix: str
    ) -> None:
        self.bounds = bounds  # upper bounds, +Inf last
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.prefixes = prefixes
        self.sum_prefix, self.count_prefix = sum_prefix, count_prefix
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += 1
        self.sum += value

    def render(self, out: list[str]) -> None:
        running = 0
        for prefix, n in zip(self.prefixes, self.counts, strict=True):
            running += n
            out.append(f"{prefix} {running}.0")
        out.append(f"{self.count_prefix} {self.total}.0")
        out.append(f"{self.sum_prefix} {fmt(self.sum)}")


C = TypeVar("C", CounterChild, GaugeChild, HistogramChild)


class _Family(Generic[C]):
    kind = ""
    suffix = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.labelnames = tuple(labelnames)
        sample = name + self.suffix
        self.header = f"# HELP {sample} {escape_help(documentation)}\n# TYPE {sample} {self.kind}"
        self._children: dict[tuple[str, ...], C] = {}
        self._default: C | None = self._make(()) if not self.labelnames else None

    def labels(self, *values: str) -> C:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = self._make(tuple(str(v) for v in values))
        return child

    def remove(self, *values: str) -> None:
        self._children.pop(values, None)

    def clear(self) -> None:
        """Drop every labelled child (a gauge whose label sets come and go)."""
        self._children.clear()

    def _make(self, values: tuple[str, ...]) -> C:
        raise NotImplementedError

    def _prefix(self, sample: str, values: tuple[str, ...], extra: str = "") -> str:
        labels = label_text(self.labelnames, values)
        if extra:
            labels = f"{labels},{extra}" if labels else extra
        return f"{sample}{{{labels}}}" if labels else sample

    def render(self, out: list[str]) -> None:
        out.append(self.header)
        if self._default is not None:
            self._default.render(out)
        for child in self._children.values():
            child.render(out)


class Counter(_Family[CounterChild]):
    kind, suffix = "counter", "_total"

    def _make(self, values: tuple[str, ...]) -> CounterChild:
        return CounterChild(self._prefix(self.name + self.suffix, values))

    def inc(self, amount: float = 1.0) -> None:
        assert self._default is not None, "a labelled counter: use .labels(...)"
        self._default.inc(amount)


class Gauge(_Family[GaugeChild]):
    kind = "gauge"

    def _make(self, values: tuple[str, ...]) -> GaugeChild:
        return GaugeChild(self._prefix(self.name, values))

    def set(self, value: float) -> None:
        assert self._default is not None, "a labelled gauge: use .labels(...)"
        self._default.set(value)


class Histogram(_Family[HistogramChild]):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if bounds[-1] != INF:
            bounds.append(INF)
        self.bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames)

    def _make(self, values: tuple[str, ...]) -> HistogramChild:
        prefixes = [
            self._prefix(f"{self.name}_bucket", values, f'le="{fmt(b)}"') for b in self.bounds
        ]
        return HistogramChild(
            self.bounds,
            prefixes,
            self._prefix(f"{self.name}_sum", values),
            self._prefix(f"{self.name}_count", values),
        )

    def observe(self, value: float) -> None:
        assert self._default is not None, "a labelled histogram: use .labels(...)"
        self._default.observe(value)


Family = Counter | Gauge | Histogram
