"""Send-path metric updates held in a tally read, once flushed, exactly as if made one by one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.dispatcher.metrics import Tally

BUCKETS = (0.005, 0.01, 0.025, 1, 10)
#: On a bound, just past it, between, past the last, zero and negative.
VALUES = (0.005, 0.0051, 0.02, 0.5, 11.0, 0.0, -1.0, 0.01, 10.0)


def samples(
    registry: CollectorRegistry, name: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        if metric.name == name
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def test_a_flushed_tally_reads_as_updates_made_one_by_one() -> None:
    direct, tallied = CollectorRegistry(), CollectorRegistry()

    def made(registry: CollectorRegistry) -> tuple[Histogram, Counter, Gauge]:
        return (
            Histogram("lat", "l", ["kind"], buckets=BUCKETS, registry=registry),
            Counter("waits", "w", ["channel", "kind"], registry=registry),
            Gauge("in_flight", "f", ["channel", "kind"], registry=registry),
        )

    h1, c1, g1 = made(direct)
    h2, c2, g2 = made(tallied)
    tally = Tally()
    for value in VALUES:
        h1.labels("webhook").observe(value)
        tally.observe(h2, ("webhook",), value)
    h1.labels("line").observe(0.3)
    tally.observe(h2, ("line",), 0.3)
    for amount in (0.25, 1.5, 0.0):
        c1.labels("7", "webhook").inc(amount)
        tally.inc(c2, ("7", "webhook"), amount)
    for value in (3, 9, 4):
        g1.labels("7", "webhook").set(value)
        tally.set(g2, ("7", "webhook"), value)

    # Nothing reaches the shared values before the flush ...
    assert all(
        v == 0 for name in ("lat", "waits", "in_flight") for v in samples(tallied, name).values()
    )
    tally.flush()
    # ... and after it every series reads as the direct one: buckets, count, sum, the
    # counter's total, the gauge's last value.
    for name in ("lat", "waits", "in_flight"):
        assert samples(tallied, name) == samples(direct, name), name
    assert (
        samples(tallied, "in_flight")[("in_flight", (("channel", "7"), ("kind", "webhook")))] == 4
    )
    # A second flush with nothing new changes nothing.
    tally.flush()
    assert samples(tallied, "lat") == samples(direct, "lat")
