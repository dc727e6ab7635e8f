"""Prometheus metrics in the text exposition format (version 0.0.4), written here: counters, gauges and
histograms with labels, thread-safe, one registry per app (no global state shared between apps)."""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if math.isnan(x):
        return "NaN"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(float(x))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, doc: str, labels: Sequence[str] = ()) -> None:
        self.name, self.doc, self.label_names = name, doc, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, doc: str, labels: Sequence[str] = (),
                 collect: Callable[[], dict[tuple[str, ...], float]] | None = None) -> None:
        super().__init__(name, doc, labels)
        self._values: dict[tuple[str, ...], float] = {}
        self._collect = collect

    def set(self, *labels: str, value: float) -> None:
        with self._lock:
            self._values[labels] = float(value)

    def render(self) -> list[str]:
        with self._lock:
            values = dict(self._values)
        if self._collect is not None:
            values.update(self._collect())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}"
                                for k, v in sorted(values.items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(name, doc, labels)
        self.buckets = tuple(sorted(buckets))
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}

    def observe(self, *labels: str, value: float) -> None:
        with self._lock:
            counts = self._counts.setdefault(labels, [0] * (len(self.buckets) + 1))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sums[labels] = self._sums.get(labels, 0.0) + float(value)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v), self._sums[k]) for k, v in self._counts.items())
        lines = self.header()
        for key, counts, total in items:
            running = 0
            for bound, c in zip((*self.buckets, math.inf), counts, strict=True):
                running += c
                le = 'le="' + _number(bound) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
        return lines


class Registry:
    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.metrics:
            lines += metric.render()
        return "\n".join(lines) + "\n"


class ServiceMetrics:
    """The service's metrics; gauges that describe live state are read when scraped."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.add(Counter("oodscope_requests_total", "HTTP requests by route and status code",
                                      ("route", "status")))
        self.latency = r.add(Histogram("oodscope_request_duration_seconds", "HTTP request latency", ("route",)))
        self.images = r.add(Counter("oodscope_images_total", "Images answered, by model and outcome (ok, error)",
                                    ("model", "outcome")))
        self.flagged = r.add(Counter("oodscope_ood_total", "Images flagged OOD at the model's alpha", ("model",)))
        self.rejected = r.add(Counter("oodscope_rejected_total", "Requests refused, by reason", ("reason",)))
        self.batch_images = r.add(Histogram("oodscope_batch_images", "Images per forward pass", ("model",),
                                            BATCH_BUCKETS))
        self.batch_requests = r.add(Histogram("oodscope_batch_requests", "Requests per forward pass", ("model",),
                                              BATCH_BUCKETS))
        self.store_seconds = r.add(Histogram("oodscope_store_write_seconds", "Store transaction time (commit "
                                             "included)", (), LATENCY_BUCKETS))
        self.store_errors = r.add(Counter("oodscope_store_errors_total", "Failed store transactions"))
        self.webhooks = r.add(Counter("oodscope_alarm_webhooks_total", "Alarm webhook deliveries by outcome",
                                      ("outcome",)))

    def live(self, name: str, doc: str, labels: Sequence[str], collect: Callable[[], dict[tuple[str, ...], float]]):
        return self.registry.add(Gauge(name, doc, labels, collect))

    def render(self) -> str:
        return self.registry.render()


__all__ = ["CONTENT_TYPE", "Counter", "Gauge", "Histogram", "Registry", "ServiceMetrics"]
