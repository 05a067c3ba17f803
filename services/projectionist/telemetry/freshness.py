"""The append-to-apply delay: how long each event waited, from its append to the commit that applied it.

Both ends are read on the database's clock (``created_at`` at the insert,
``clock_timestamp()`` in the batch's checkpoint update), so no host's clock
skews it. It is the SLI of the freshness objective (docs/operate/slo.md).
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from itertools import repeat
from operator import sub

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from projectionist.records import RecordedEvent

#: Seconds. The objective's threshold must be one of these bounds (5 s by
#: default); the others give the percentiles from milliseconds to minutes.
APPLY_DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_ZERO = timedelta(0)


class ApplyDelay:
    """One label set's buckets. :meth:`observe_batch` counts a whole batch at once."""

    __slots__ = ("_bounds", "_cumulative", "_exemplars", "_lock", "_offsets", "_sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = tuple(bounds)
        self._offsets = tuple(timedelta(seconds=b) for b in self._bounds)
        self._lock = threading.Lock()
        # Cumulative, as exported: [i] counts delays <= bounds[i]; the last is +Inf (the count).
        self._cumulative = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        self._exemplars: list[Exemplar | None] = [None] * (len(self._bounds) + 1)

    def observe_batch(
        self, applied_at: datetime, events: Sequence[RecordedEvent], trace_id: str | None = None
    ) -> None:
        """Count ``applied_at - created_at`` of every event.

        A batch is hundreds of events, and a histogram's ``observe`` per event
        cost about 2 µs each, most of a no-op batch's telemetry budget. Sorted
        once, a bisection per bucket bound counts them all: a delay is at
        most ``b`` exactly when the event was created at or after
        ``applied_at - b``. ``trace_id`` becomes the exemplar of the bucket
        of the batch's longest delay.
        """
        if not events:
            return
        created = sorted([e.created_at for e in events])
        n = len(created)
        counts = [n - bisect_left(created, applied_at - offset) for offset in self._offsets]
        oldest = created[0]
        longest = (applied_at - oldest).total_seconds()
        # sum(applied_at - c) without a float conversion per event.
        total = ((applied_at - oldest) * n - sum(map(sub, created, repeat(oldest)), _ZERO)).total_seconds()
        exemplar = None
        if trace_id:
            exemplar = Exemplar({"trace_id": trace_id}, longest, time.time())
        with self._lock:
            cumulative = self._cumulative
            for i, count in enumerate(counts):
                cumulative[i] += count
            cumulative[-1] += n
            self._sum += total
            if exemplar is not None:
                self._exemplars[bisect_left(self._bounds, longest)] = exemplar

    def snapshot(self) -> tuple[list[int], float, list[Exemplar | None]]:
        with self._lock:
            return list(self._cumulative), self._sum, list(self._exemplars)


class ApplyDelayHistogram(Collector):
    """``projectionist_apply_delay_seconds``: a histogram whose children take a whole batch at once."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float] = APPLY_DELAY_BUCKETS,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError("buckets must be distinct and in increasing order")
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(float(b) for b in buckets)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, ...], ApplyDelay] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> ApplyDelay:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        with self._lock:
            child = self._children.get(values)
            if child is None:
                child = self._children[values] = ApplyDelay(self.buckets)
        return child

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        # repr, as prometheus_client writes a bound: 5.0 is "5.0", the label the objective selects.
        bounds = [repr(b) for b in self.buckets] + ["+Inf"]
        for values, child in children:
            cumulative, total, exemplars = child.snapshot()
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            for le, count, exemplar in zip(bounds, cumulative, exemplars, strict=True):
                buckets.append((le, float(count)) if exemplar is None else (le, float(count), exemplar))
            family.add_metric(list(values), buckets, total)
        yield family
