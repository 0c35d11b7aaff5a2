"""Dispatcher metrics. In worker processes these live in Prometheus' multiprocess directory
and are served, summed over processes, by dramatiq's Prometheus middleware.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DELIVERIES = Counter(
    "bcast_deliveries_total",
    "Recipients finished or put back, by channel kind and outcome "
    "(sent, failed, retry, throttled, released).",
    ["kind", "outcome"],
)
PROVIDER_LATENCY = Histogram(
    "bcast_provider_request_duration_seconds",
    "Time a provider took to answer one send.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RATE_WAIT = Histogram(
    "bcast_rate_limit_wait_seconds",
    "How far ahead the last of a group of send slots lay when the group was taken.",
    ["kind"],
    buckets=(0, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
THROTTLED = Counter(
    "bcast_provider_throttled_total",
    "Times a provider told a channel to slow down (429 / Retry-After).",
    ["kind"],
)
IN_FLIGHT = Gauge(
    "bcast_provider_requests_in_flight",
    "Provider calls under way, as of the last result write.",
    ["kind"],
    multiprocess_mode="livesum",
)
SNAPSHOT_ROWS = Counter(
    "bcast_snapshot_recipients_total", "Recipients copied into delivery rows at broadcast start."
)
BATCHES = Counter("bcast_batches_enqueued_total", "send_batch messages enqueued.")
FLUSH_LATENCY = Histogram(
    "bcast_result_flush_duration_seconds",
    "Time to write one batch of send results to Postgres.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
