"""Every metric, defined once against an injected registry (never the global one).

Labels are bounded: upstream, provider, method, status class, result. Per-account facts are
reported as counts of accounts by state, never as one series per account.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sidecar_requests",
            "Requests answered, by upstream, method and status class.",
            ["upstream", "method", "status_class"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "sidecar_upstream_request_duration_seconds",
            "Time from sending a request upstream to receiving its response headers.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
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
        self.accounts = Gauge(
            "sidecar_accounts",
            "Accounts by provider and state.",
            ["provider", "state"],
            registry=r,
        )
