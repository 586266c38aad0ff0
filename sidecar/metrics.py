"""Every metric, defined once against an injected registry (never the global one).

Labels are bounded: upstream, provider, method, status class, result. Per-account facts are
reported as counts of accounts by state, never as one series per account.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = LoopCounter(
            "sidecar_requests",
            "Requests answered, by upstream, method and status class.",
            ["upstream", "method", "status_class"],
            r,
        )
        self.upstream_latency = LoopHistogram(
            "sidecar_upstream_request_duration_seconds",
            "Time from sending a request upstream to receiving its response headers.",
            ["upstream"],
            LATENCY_BUCKETS,
            r,
        )
        self.sidecar_errors = Counter(
            "sidecar_errors",
            "Responses the sidecar made itself, by X-Sidecar-Error code.",
            ["upstream", "code"],
            registry=r,
        )
        self.retries = Counter(
            "sidecar_retries",
            "Invalid-token answers from upstream, by what happened next "
            "(replayed, not_replayable, refresh_failed).",
            ["upstream", "outcome"],
            registry=r,
        )
        self.refreshes = Counter(
            "sidecar_token_refreshes",
            "Token endpoint calls, by provider and result (success, transient_error, fatal_error).",
            ["provider", "result"],
            registry=r,
        )
        self.refresh_latency = Histogram(
            "sidecar_token_refresh_duration_seconds",
            "Token endpoint call duration.",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lock_wait = Histogram(
            "sidecar_refresh_lock_wait_seconds",
            "Time waiting for an account's refresh lock (shared with other replicas).",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.background_skipped = Counter(
            "sidecar_background_refreshes_skipped",
            "Background refreshes skipped because another replica held the account's refresh "
            "lock (it is refreshing that account); the next pass looks at the account again.",
            ["provider"],
            registry=r,
        )
        self.coalesced = Counter(
            "sidecar_refresh_waiters_coalesced",
            "Refreshes not made because another caller was already refreshing the account.",
            ["provider"],
            registry=r,
        )
        self.expired_injections = Counter(
            "sidecar_expired_token_injections",
            "Requests sent upstream with an access token already past its expiry. "
            "Should stay 0: alert if it moves.",
            ["upstream"],
            registry=r,
        )
        self.reauthorizations = Counter(
            "sidecar_account_reauthorizations",
            "Accounts that became reauthorization_required, by provider and reason.",
            ["provider", "reason"],
            registry=r,
        )
        self.answers_lost = Counter(
            "sidecar_token_answers_lost",
            "Token requests sent whose answer never came back (timeout, connection_lost, "
            "unconcluded_refresh): the provider may have rotated the refresh token.",
            ["provider", "cause"],
            registry=r,
        )
        self.accounts = Gauge(
            "sidecar_accounts",
            "Accounts by provider and state.",
            ["provider", "state"],
            registry=r,
        )


# The two metrics every proxied request touches. prometheus_client's children take a lock per
# update (they may be shared by threads); these are updated by the event loop alone, so a
# plain add does, and the registry reads them when scraped.


class CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramValue:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class LoopCounter:
    """A labelled counter updated only from the event loop (no lock)."""

    def __init__(
        self, name: str, doc: str, labels: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self._name, self._doc, self._labels = name, doc, list(labels)
        self._children: dict[tuple[str, ...], CounterValue] = {}
        registry.register(self)

    def labels(self, *values: str) -> CounterValue:
        return self._children.setdefault(values, CounterValue())

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._doc, labels=self._labels)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labels)
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)
        yield family


class LoopHistogram:
    """A labelled histogram updated only from the event loop (no lock)."""

    def __init__(
        self,
        name: str,
        doc: str,
        labels: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._doc, self._labels = name, doc, list(labels)
        self._bounds = tuple(float(b) for b in buckets)
        self._children: dict[tuple[str, ...], HistogramValue] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramValue:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = HistogramValue(self._bounds)
        return child

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._doc, labels=self._labels)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labels)
        for values, child in self._children.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*self._bounds, float("inf")), child.counts, strict=True):
                cumulative += count
                buckets.append((_le(bound), float(cumulative)))
            family.add_metric(list(values), buckets, child.sum)
        yield family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
