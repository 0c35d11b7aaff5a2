"""The fault suite: real broadcasts through real processes while things break.

Starts a private Postgres cluster and a private RabbitMQ node (never the machine's own), then
for each scenario a fresh database and vhost, the provider simulator, the API, schedulers and
dispatchers; sends a broadcast, injects the scenario's fault mid-send, and checks that it
completes with nothing lost, repeats only within their bound, and nothing stuck. Prints one line
per scenario, writes the same as JSON, and exits non-zero if any scenario failed.

    .venv/bin/python -m bench.faults [--recipients 100000] [--scenario NAME ...]
                                     [--json results/faults.json]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.faults.report import bounds, describe, table, write_json
from bench.faults.scenarios import SCENARIOS, Scale, base_settings
from bench.faults.suite import run_suite


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipients", type=int, default=Scale.recipients)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run only this scenario (may be repeated; default: all, in this order)",
    )
    parser.add_argument("--json", type=Path, default=Path("results/faults.json"))
    parser.add_argument(
        "--send-seconds",
        type=float,
        default=Scale.send_seconds,
        help="the channel's rate limit makes the send take about this long without faults",
    )
    parser.add_argument("--outage-seconds", type=float, default=Scale.outage_seconds)
    parser.add_argument("--storm-seconds", type=float, default=Scale.storm_seconds)
    parser.add_argument("--deadline-seconds", type=float, default=Scale.deadline_seconds)
    parser.add_argument(
        "--postgres-down-seconds",
        type=float,
        default=Scale.postgres_down_seconds,
        help="restart-postgres keeps Postgres stopped this long (default: starts it at once)",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' logs even if all passed"
    )
    args = parser.parse_args(argv)
    # Ctrl-C or SIGTERM: every process, the private servers and their files still go.
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    names = args.scenario or list(SCENARIOS)
    scale = Scale(
        recipients=args.recipients,
        send_seconds=args.send_seconds,
        outage_seconds=args.outage_seconds,
        storm_seconds=args.storm_seconds,
        deadline_seconds=args.deadline_seconds,
        postgres_down_seconds=args.postgres_down_seconds,
    )
    logs = Path(tempfile.mkdtemp(prefix="bcast-faults-logs-"))
    began = time.monotonic()
    print(f"fault suite: {', '.join(names)}; {scale.recipients:,} recipients; logs in {logs}")

    def done(verdict_line: str) -> None:
        print(verdict_line, flush=True)

    try:
        verdicts = run_suite(names, scale, logs, on_verdict=lambda v: done(describe(v)))
    except KeyboardInterrupt:
        print(f"interrupted: everything it started is stopped and removed; logs in {logs}")
        return 130
    print()
    print(table(verdicts))
    print()
    print("repeat bounds:")
    print(bounds(verdicts))
    write_json(
        args.json,
        verdicts,
        {
            "command": shlex.join(["python", "-m", "bench.faults", *sys.argv[1:]]),
            "scale": asdict(scale),
            "settings": base_settings(scale),
            "total_seconds": round(time.monotonic() - began, 1),
        },
    )
    print(f"\nwritten to {args.json}")
    passed = all(v.passed for v in verdicts)
    if passed and not args.keep_logs:
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"logs kept in {logs}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
