"""The benchmarks' one entry point; results go to bench/results/latest.json.

    .venv/bin/python -m bench all [--quick | --full]     # quick: 100,000 recipients; full: 1,000,000
    .venv/bin/python -m bench e2e [--recipients N]
    .venv/bin/python -m bench naive [--recipients N]     # the naive design against the pipeline
    .venv/bin/python -m bench scale-out [--recipients N] # all: 20,000 quick, 50,000 full
    .venv/bin/python -m bench channels                   # each provider kind at its limit

``all`` sends to a tenth of the audience and to all of it (time per recipient and memory as it
grows), and after the large run sends it once more as the 10th broadcast the delivery table has
seen (the 8 between written by SQL, as sent), keeping a flame graph of a dispatcher worker in
bench/results/flame-dispatcher.svg.

The naive design runs on 100,000 recipients in ``all`` (quick or full), against the pipeline
on the same number measured in the same run.

Then ``.venv/bin/python -m bench.readme`` puts the figures into README.md.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from typing import Any

from bench import channels, e2e, http_client, naive, pause, rate_limited, scale_out, scheduler
from bench.results import DIR, LATEST, load, markdown, save

QUICK = 100_000
FULL = 1_000_000
#: Recipients of each scale-out run (five runs, each with its own setup).
SCALE_OUT_QUICK = 20_000
SCALE_OUT_FULL = 50_000
#: Broadcasts of the whole audience the delivery table has seen when the last one is measured.
HISTORY = 10


def sized(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    """The ``e2e``, ``memory`` and ``cpu`` sections from a run of a tenth of the audience and
    one of all of it: time per recipient and memory as the audience grows tenfold.
    """
    per_small = small["seconds"] / small["recipients"]
    per_large = large["seconds"] / large["recipients"]
    summary = {k: small[k] for k in ("recipients", "seconds", "per_second", "ratio_to_raw")}
    return {
        "e2e": {
            **large,
            "small": summary,
            "per_recipient_growth": round(per_large / per_small, 3),
        },
        "memory": {
            "rss_mib_small": small["dispatcher_peak_rss_mib"],
            "rss_mib_large": large["dispatcher_peak_rss_mib"],
            "recipients_small": small["recipients"],
            "recipients_large": large["recipients"],
        },
        "cpu": {
            f"{name}_us_per_recipient": value
            for name, value in large["cpu_us_per_recipient"].items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="what", required=True)
    every = sub.add_parser("all", help="every benchmark")
    size = every.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=f"{QUICK:,} recipients (default)")
    size.add_argument("--full", action="store_true", help=f"{FULL:,} recipients")
    one = sub.add_parser("e2e", help="create -> completed against the raw limit")
    one.add_argument("--recipients", type=int, default=QUICK)
    naive_one = sub.add_parser(
        "naive", help="one message per recipient, synchronous HTTP: the pipeline's speed-up"
    )
    naive_one.add_argument("--recipients", type=int, default=QUICK)
    sub.add_parser("http-client", help="client CPU per request: bcast's own, aiohttp, httpx")
    sub.add_parser("pause", help="provider calls after a pause answered, repeated")
    sub.add_parser("scheduler", help="10,000 timed sends due in the same second")
    scaled = sub.add_parser(
        "scale-out",
        help="1, 2 and 4 dispatcher groups, 2 schedulers, 25 channels: throughput and cost",
    )
    scaled.add_argument("--recipients", type=int, default=SCALE_OUT_QUICK, help="a run")
    kinds = sub.add_parser(
        "channels", help="each provider kind at its own limit (LINE: push and multicast)"
    )
    kinds.add_argument("--seconds", type=float, default=channels.SECONDS)
    kinds.add_argument("--line-recipients", type=int, default=channels.LINE_MULTICAST)
    limited = sub.add_parser("rate-limited", help="channels at their limits, 4 dispatchers")
    limited.add_argument("--seconds", type=float, default=15.0)
    for p in (every, one, naive_one, scaled):
        p.add_argument("--processes", type=int, default=e2e.Shape.processes)
        p.add_argument("--threads", type=int, default=e2e.Shape.threads)
    args = parser.parse_args(argv)
    # A SIGTERM stops the run as Ctrl-C does: the private Postgres, the scratch vhost and
    # the started processes are stopped and removed on the way out.
    signal.signal(signal.SIGTERM, _stop)
    sections: dict[str, object] = {}
    # Only the runs that start dispatchers of their own shape take --processes/--threads.
    shape = e2e.Shape(
        processes=getattr(args, "processes", e2e.Shape.processes),
        threads=getattr(args, "threads", e2e.Shape.threads),
    )
    if args.what == "e2e":
        sections["e2e"] = e2e.run(args.recipients, shape)
    runs: list[dict[str, Any]] = []
    if args.what == "all":
        n = FULL if args.full else QUICK
        small = e2e.run(n // 10, shape)
        large = e2e.run(n, shape, history=HISTORY, flame=DIR / "flame-dispatcher.svg")
        runs = [small, large]
        sections.update(sized(small, large))
    if args.what in ("all", "naive"):
        n = QUICK if args.what == "all" else args.recipients
        pipeline = next((r for r in runs if r["recipients"] == n), None)
        if pipeline is None:
            print(f"the pipeline on {n:,} recipients, to compare the naive design with")
            pipeline = e2e.run(n, shape)
        sections["naive"] = naive.compared(naive.run(n, shape), pipeline)
    if args.what in ("all", "scale-out"):
        n = (
            (SCALE_OUT_FULL if args.full else SCALE_OUT_QUICK)
            if args.what == "all"
            else args.recipients
        )
        sections["scale_out"] = scale_out.run(n, shape)
    if args.what in ("all", "http-client"):
        sections["http_client"] = http_client.run()
    if args.what in ("all", "scheduler"):
        sections["scheduler"] = scheduler.run()
    if args.what in ("all", "pause"):
        sections["pause"] = pause.run()
    if args.what in ("all", "rate-limited"):
        sections["rate_limited"] = rate_limited.run(seconds=getattr(args, "seconds", 15.0))
    if args.what in ("all", "channels"):
        sections["channels"] = channels.run(
            seconds=getattr(args, "seconds", channels.SECONDS),
            line_recipients=getattr(args, "line_recipients", channels.LINE_MULTICAST),
        )
    dated = save(sections, shlex.join(["python", "-m", "bench", *(argv or sys.argv[1:])]))
    print(markdown(load()))
    print(f"\nwritten to {LATEST} and {dated}")
    return 0


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
