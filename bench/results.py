"""The benchmarks' results file: ``bench/results/latest.json``, a dated copy, and a markdown
table beside it. Each run updates the sections it measured and keeps the others.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

DIR = Path(__file__).resolve().parent / "results"
LATEST = DIR / "latest.json"
PACKAGES = (
    "aiohttp",
    "dramatiq",
    "psycopg",
    "SQLAlchemy",
    "fastapi",
    "uvicorn",
    "pika",
    "requests",
)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "packages": versions,
    }


def load() -> dict[str, Any]:
    if LATEST.exists():
        data: dict[str, Any] = json.loads(LATEST.read_text())
        return data
    return {}


def save(sections: dict[str, Any], command: str) -> Path:
    """Merge ``sections`` into the latest results and write them (and a dated copy)."""
    now = datetime.now(UTC)
    results = load()
    results.update(sections)
    results["machine"] = machine()
    results["written_at"] = now.isoformat(timespec="seconds")
    results.setdefault("commands", {})
    for name in sections:
        results["commands"][name] = command
    DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2, sort_keys=True) + "\n"
    LATEST.write_text(text)
    dated = DIR / f"{now:%Y-%m-%dT%H%M%SZ}.json"
    dated.write_text(text)
    (DIR / "latest.md").write_text(markdown(results) + "\n")
    return dated


def markdown(results: dict[str, Any]) -> str:
    """The results as the table the README shows."""
    lines = ["| measure | value |", "| --- | --- |"]
    e2e = results.get("e2e")
    if e2e:
        lines += [
            f"| recipients, create -> completed | {e2e['recipients']:,} in {e2e['seconds']:.1f} s |",
            f"| pipeline (unique accepted sends / s) | {e2e['per_second']:,.0f}"
            + (
                f" (one webhook channel, its limit {e2e['channel_rate_per_second']:,.0f} / s) |"
                if "channel_rate_per_second" in e2e
                else " |"
            ),
            f"| raw limit: one plain aiohttp client process, same route, unique signed bodies (/ s) | {e2e['raw_per_second']:,.0f}"
            + (
                f" (the better of {e2e['raw_per_second_before']:,.0f} before the pipeline and "
                f"{e2e['raw_per_second_after']:,.0f} after it) |"
                if "raw_per_second_after" in e2e
                else " |"
            ),
            f"| **ratio pipeline / raw** | **{e2e['ratio_to_raw']:.2f}** |",
            f"| accepted / duplicates / bad signatures | {e2e['accepted']:,} / {e2e['duplicates']} / {e2e['bad_signatures']} |",
        ]
        cpu = e2e.get("cpu_us_per_recipient", {})
        if cpu:
            lines.append(cpu_row("CPU µs per recipient", cpu))
        raw_cpu = e2e.get("raw_cpu")
        if raw_cpu and "machine_busy" in e2e:
            lines.append(
                f"| cores busy: pipeline / raw limit | {e2e['machine_busy']:.0%} / "
                f"{raw_cpu['machine_busy']:.0%} (raw CPU µs per request: simulator "
                f"{raw_cpu['simulator_us_per_request']:.0f}, client "
                f"{raw_cpu['client_us_per_request']:.0f}) |"
            )
        if "dispatcher_peak_rss_mib" in e2e:
            lines.append(
                f"| dispatcher peak RSS (all processes) | {e2e['dispatcher_peak_rss_mib']:.0f} MiB |"
            )
        settings = e2e.get("postgres_settings")
        if settings:
            lines.append(
                "| Postgres of these runs (a private cluster) | "
                + ", ".join(f"{k} {v}" for k, v in settings.items())
                + (
                    "; the imported contacts vacuumed and checkpointed before the clock starts"
                    if e2e.get("settled")
                    else ""
                )
                + " |"
            )
        small = e2e.get("small")
        if small and "per_recipient_growth" in e2e:
            lines.append(
                f"| time per recipient, {e2e['recipients']:,} against {small['recipients']:,} "
                f"recipients ({small['recipients']:,} in {small['seconds']:.1f} s) | "
                f"**{e2e['per_recipient_growth']:.2f}x** |"
            )
        history = e2e.get("history")
        if history:
            lines.append(
                f"| broadcast no. {history['broadcasts']} of the same {e2e['recipients']:,}, "
                f"{history['rows_before_last']:,} delivery rows already in the table | "
                f"{history['last_seconds']:.1f} s against {history['first_seconds']:.1f} s for "
                f"the first (**{history['growth']:.2f}x**); Postgres CPU µs per recipient "
                f"{history['postgres_us_last']:,.0f} against {history['postgres_us_first']:,.0f}"
                + (
                    "; py-spy sampled one of its dispatcher workers"
                    if history.get("profiled")
                    else ""
                )
                + " |"
            )
    memory = results.get("memory")
    if memory:
        lines.append(
            f"| dispatcher peak RSS, {memory['recipients_small']:,} / "
            f"{memory['recipients_large']:,} recipients | {memory['rss_mib_small']:.0f} / "
            f"{memory['rss_mib_large']:.0f} MiB |"
        )
    slow = results.get("naive")
    if slow:
        lines += [
            f"| naive design, same audience: one dramatiq message per recipient, synchronous "
            f"HTTP ({slow['http_client']}), {slow['workers']} | {slow['recipients']:,} in "
            f"{slow['seconds']:.1f} s, {slow['per_second']:,.0f} / s; accepted / duplicates / bad "
            f"signatures {slow['accepted']:,} / {slow['duplicates']} / {slow['bad_signatures']} |",
            f"| **speed-up of the pipeline over the naive design** | **{slow['speedup']:.1f}x** "
            f"({slow['e2e_per_second']:,.0f} / s against {slow['per_second']:,.0f} / s, "
            f"{slow['recipients']:,} recipients each, same run) |",
        ]
        cpu = slow.get("cpu_us_per_recipient", {})
        if cpu:
            lines.append(cpu_row("naive design CPU µs per recipient", cpu))
    client = results.get("http_client")
    if client:
        if "bcast_us_per_request" in client:
            lines.append(
                f"| HTTP client CPU per request, {client['in_flight']} in flight | bcast's own "
                f"{client['bcast_us_per_request']:,.0f} µs, aiohttp "
                f"{client['aiohttp_us_per_request']:,.0f} µs, httpx "
                f"{client['httpx_us_per_request']:,.0f} µs: bcast's own client is on the send "
                "path |"
            )
        else:
            lines.append(
                f"| HTTP client CPU per request, {client['in_flight']} in flight | aiohttp "
                f"{client['aiohttp_us_per_request']:,.0f} µs, httpx "
                f"{client['httpx_us_per_request']:,.0f} µs "
                f"({client['httpx_over_aiohttp_cpu']:.1f}x): aiohttp was on the send path |"
            )
    limited = results.get("rate_limited")
    if limited:
        for r in limited["runs"]:
            lines.append(
                f"| {r['channels']} channels at {r['limit_per_second']:g}/s, "
                f"{r['dispatcher_processes']} dispatcher processes | achieved {r['min_fraction']:.3f}"
                f"-{r['mean_fraction']:.3f} of the limit (min-mean); worst second "
                f"{r['worst_window_ratio']:.3f} of it"
                + (
                    f"; slots taken but let pass unused: at most {r['max_unused_slot_share']:.1%}"
                    " of a channel's"
                    if "max_unused_slot_share" in r
                    else ""
                )
                + " |"
            )
    kinds = results.get("channels")
    if kinds:
        lines += channel_rows(kinds)
    timed = results.get("scheduler")
    if timed:
        lines.append(
            f"| {timed['timed_sends']:,} timed sends due in the same second | started p50 "
            f"{timed['p50_lateness_s']:.3f} s, p99 {timed['p99_lateness_s']:.3f} s late; first "
            f"provider call p50 {timed['p50_send_lateness_s']:.3f} s, p99 "
            f"{timed['p99_send_lateness_s']:.3f} s |"
        )
    paused = results.get("pause")
    if paused:
        lines.append(
            f"| pause during a send ({paused['repeats']} repeats): last provider call after the "
            f"pause answered | p50 {paused['p50_s']:.3f} s, p99 {paused['p99_s']:.3f} s; at most "
            f"{paused['slipped_max']} calls arrived after it, all within the p99 |"
        )
    scaled = results.get("scale_out")
    if scaled:
        lines += scale_out_rows(scaled, results.get("machine", {}).get("cores"))
    m = results.get("machine", {})
    lines.append(f"| machine | {m.get('cores', '?')} cores, Python {m.get('python', '?')} |")
    return "\n".join(lines)


def channel_rows(kinds: dict[str, Any]) -> list[str]:
    """One row per provider kind at its own limit."""
    rows = []
    for label, r in kinds.items():
        per_call = r["recipients"] / max(1, r["requests"])
        rows.append(
            f"| {label.replace('_', ' ')}: {r['recipients']:,} recipients at the provider's "
            f"{r['limit_requests_per_second']:g} requests/s | {r['requests_per_second']:,.1f} "
            f"requests/s ({r['fraction_of_limit']:.3f} of the limit; worst second "
            f"{r['worst_window_ratio']:.3f} of it), **{r['recipients_per_second']:,.0f} "
            f"recipients/s** ({per_call:,.1f} a request; "
            f"{r['recipients_per_second_create_to_completed']:,.0f}/s create -> completed) |"
        )
    return rows


def cpu_row(label: str, cpu: dict[str, float]) -> str:
    """A table row of CPU µs per recipient, process by process."""
    return f"| {label} | " + ", ".join(f"{k} {v:,.0f}" for k, v in cpu.items()) + " |"


def scale_out_rows(scaled: dict[str, Any], cores: int | None) -> list[str]:
    """One row per scale-out run, after a row saying what the runs can show."""
    rows = [
        f"| scale-out: {scaled['recipients']:,} recipients a run, each dispatcher group "
        f"{scaled['group']}, one Postgres and one RabbitMQ | every group on the same "
        f"{cores or '?'} cores: the runs show coordination cost and where throughput "
        "flattens, not more hardware |"
    ]
    for r in scaled["runs"]:
        pg = r["postgres_per_recipient"]
        groups = " / ".join(f"{g['per_second']:,.0f}" for g in r["per_group"])
        started = (
            f"{r['idle_groups']} group(s) sent nothing"
            if r["idle_groups"]
            else f"every group sent within {r['last_first_send_s']:.1f} s"
        )
        against = (
            f"{r['vs_first_run']:.2f} of the first run"
            if r.get("channels", 1) == 1
            else f"the channels' limits allow {r['channels'] * r['channel_rate']:,.0f}"
        )
        rows.append(
            f"| {r['name']} | {r['per_second']:,.0f} recipients/s ({against}; per group "
            f"{groups}; {started}); per recipient: Postgres "
            f"{pg['rows_written']:.2f} rows written, {pg['wal_bytes']:,.0f} B WAL, "
            f"{pg['statements']:.3f} statements, {r['cpu_us_per_recipient']['postgres']:,.0f} µs "
            f"CPU; dispatchers {r['cpu_us_per_recipient']['dispatchers']:,.0f} µs CPU; RabbitMQ "
            f"{r['rabbitmq_per_recipient']['taken_by_dispatchers']:.4f} messages |"
        )
    return rows
