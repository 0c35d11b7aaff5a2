"""Dispatcher metrics. In worker processes these live in Prometheus' multiprocess directory
and are served, summed over processes, by dramatiq's Prometheus middleware.

Per-channel series carry the channel id (and its kind); never a recipient.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from shared.domain.lifecycle import CHANNEL_KINDS

DELIVERIES = Counter(
    "bcast_deliveries_total",
    "Recipients finished or put back, by channel kind and outcome "
    "(sent, failed, partial, retry, throttled, held: stopped between the parts of a message, "
    "released: given back without a call).",
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
CHANNEL_SLOT_WAIT = Counter(
    "bcast_channel_slot_wait_seconds_total",
    "Seconds sends of a channel waited for their rate-limit slot (summed over sends).",
    ["channel", "kind"],
)
CHANNEL_SLOTS_UNUSED = Counter(
    "bcast_channel_slots_unused_total",
    "Rate-limit slots a channel's sends took but did not use, by why: late (the send came "
    "too late for its slot: a busy or stalled process; it takes another), stopped (sending "
    "stopped or the provider said wait while the send waited for its slot), left (taken in a "
    "block and needed by no send before it passed: the end of a broadcast, a small one on a "
    "fast channel). Capacity lost, never a call made late.",
    ["channel", "kind", "reason"],
)
#: Values of ``CHANNEL_SLOTS_UNUSED``' reason label.
SLOT_REASONS = ("late", "stopped", "left")
CHANNEL_SENDS = Counter(
    "bcast_channel_sends_total",
    "Provider calls made for a channel.",
    ["channel", "kind"],
)
CHANNEL_DELIVERIES = Counter(
    "bcast_channel_deliveries_total",
    "Provider answers for a channel's recipients, by outcome (sent, failed, partial, retry: "
    "a failure to be tried again). One series per channel and outcome, so a channel that fails "
    "can be told apart from the rest.",
    ["channel", "kind", "outcome"],
)
CHANNEL_IN_FLIGHT = Gauge(
    "bcast_channel_in_flight",
    "Sends of a channel scheduled or under way (its lane), as of the last result write.",
    ["channel", "kind"],
    multiprocess_mode="livesum",
)
CHANNEL_THROTTLED = Counter(
    "bcast_channel_throttled_total",
    "Times a provider told this channel to slow down (429 / Retry-After).",
    ["channel", "kind"],
)
RESULTS_DROPPED = Counter(
    "bcast_results_dropped_total",
    "Send results not written because their run had lost its lease (the rows were taken back).",
    ["kind"],
)
LEASES_LOST = Counter(
    "bcast_batch_leases_lost_total",
    "Batch runs that found their lease taken back while they ran.",
)
BATCH_RUNS = Gauge(
    "bcast_batch_runs",
    "Batches this dispatcher is running now.",
    multiprocess_mode="livesum",
)
BATCH_ENDS = Counter(
    "bcast_batch_runs_ended_total",
    "Batch runs ended, by why: done, wait (given back until due), not_sending (paused, "
    "canceled, completed), slice (handed back to spread the work), stopping, lease_lost, error.",
    ["reason"],
)
BROADCASTS_HELD = Counter(
    "bcast_broadcasts_held_total",
    "Broadcasts a dispatcher paused because their channel cannot be used (its provider address "
    "refused, its configuration unreadable): they wait for an operator.",
)
SNAPSHOT_ROWS = Counter(
    "bcast_snapshot_recipients_total", "Recipients copied into delivery rows at broadcast start."
)
FLUSH_LATENCY = Histogram(
    "bcast_result_flush_duration_seconds",
    "Time to write one batch of send results to Postgres.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)

#: Values of ``DELIVERIES``' outcome label (the retry policy's labels and the recorder's own).
OUTCOMES = ("sent", "failed", "partial", "retry", "throttled", "held", "released")
#: Values of ``CHANNEL_DELIVERIES``' outcome label: the outcomes of a provider call.
CHANNEL_OUTCOMES = ("sent", "failed", "partial", "retry")
#: Values of ``BATCH_ENDS``' reason label.
BATCH_END_REASONS = ("done", "wait", "not_sending", "slice", "stopping", "lease_lost", "error")


def init_metrics() -> None:
    """Every series whose label values are known at start, at 0: the first increment after a
    start (a restart, a scale-up) must read as a rise in ``rate()``, not as a new series.
    """
    for kind in CHANNEL_KINDS:
        for outcome in OUTCOMES:
            DELIVERIES.labels(kind, outcome)
        for metric in (PROVIDER_LATENCY, RATE_WAIT, THROTTLED, RESULTS_DROPPED):
            metric.labels(kind)
    for reason in BATCH_END_REASONS:
        BATCH_ENDS.labels(reason)


def init_channel(channel_id: int, kind: str) -> None:
    """A channel's series at 0 when this process first sees it, before its first send."""
    channel = str(channel_id)
    for metric in (CHANNEL_SENDS, CHANNEL_THROTTLED, CHANNEL_SLOT_WAIT):
        metric.labels(channel, kind)
    for reason in SLOT_REASONS:
        CHANNEL_SLOTS_UNUSED.labels(channel, kind, reason)
    for outcome in CHANNEL_OUTCOMES:
        CHANNEL_DELIVERIES.labels(channel, kind, outcome)


class Tally:
    """Updates made on the send path, held in this process and applied to the shared values
    in one go (``flush``: at each result write and when a run ends). In a worker process an
    update of a metric takes a lock, reads the process id and writes the value to its mmap
    file, 1.5-2.5 µs, and a send made several; a tally's update is a dict lookup and an
    addition. What Prometheus reads is the same, at most one write tick (50 ms) later. Used
    from the event loop's thread only.
    """

    def __init__(self) -> None:
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        #: Histogram child -> count per bucket, then the sum of the values.
        self._observed: dict[Any, list[float]] = {}
        self._added: dict[Any, float] = {}
        self._set: dict[Any, float] = {}

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, metric: Histogram, labels: tuple[str, ...], value: float) -> None:
        child = self._child(metric, labels)
        counts = self._observed.get(child)
        if counts is None:
            counts = self._observed[child] = [0.0] * (len(child._upper_bounds) + 1)
        # The first bucket whose bound is at least the value, as Histogram.observe picks.
        counts[bisect_left(child._upper_bounds, value)] += 1
        counts[-1] += value

    def inc(self, metric: Counter, labels: tuple[str, ...], amount: float = 1.0) -> None:
        child = self._child(metric, labels)
        self._added[child] = self._added.get(child, 0.0) + amount

    def set(self, metric: Gauge, labels: tuple[str, ...], value: float) -> None:
        self._set[self._child(metric, labels)] = value

    def flush(self) -> None:
        """Apply what is held (the only updates to these series' values)."""
        observed, self._observed = self._observed, {}
        added, self._added = self._added, {}
        held, self._set = self._set, {}
        for child, counts in observed.items():
            child._sum.inc(counts[-1])
            for bucket, count in zip(child._buckets, counts[:-1], strict=True):
                if count:
                    bucket.inc(count)
        for counter, amount in added.items():
            counter.inc(amount)
        for gauge, value in held.items():
            gauge.set(value)


#: The process's tally of send-path updates.
TALLY = Tally()
