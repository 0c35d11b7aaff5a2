"""The Grafana dashboards (deploy/grafana/dashboards/) are right, not only well formed.

The overview (bcast.json) reads Prometheus: its expressions are parsed, and every selector of a
metric with a ``kind`` or ``channel`` label must filter on the dashboard's variable, and every
gauge all schedulers export alike (one table, measured by each) must be taken as a ``max``,
never summed. The checks are shown to fail on expressions that break those rules. promtool
parses every expression (variables at All), and evaluates the outbox and failure-ratio panels'
own expressions on series of two schedulers and three channels.

The per-broadcast dashboard (bcast-broadcast.json) reads Postgres: each of its queries, with
Grafana's variable and macro substitution done as Grafana does it (``grafana_sql``), runs
against the project's schema holding a finished broadcast and one being sent, read-only as the
role docs/dashboards.md creates, on indexes and in one partition of ``delivery``, and answers
what the rows say.

``dashboard_sql`` and ``grafana_sql`` (a dashboard's SQL as Postgres receives it), and
``prometheus_targets`` and ``promql`` (its expressions as Prometheus receives them) are meant
for other tests too.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client import REGISTRY, Gauge
from psycopg import sql

import services.api.middleware
import services.api.routes.health
import services.dispatcher.metrics
import services.scheduler.partitions
import services.scheduler.scheduler
import shared.heartbeat  # noqa: F401 - registers the heartbeat gauge
from shared.db.engine import libpq_url
from shared.domain.lifecycle import CANCELED_REASON
from tests.conftest import Api
from tests.factories import start_with_deliveries

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
OVERVIEW = DASHBOARDS / "bcast.json"
BROADCAST = DASHBOARDS / "bcast-broadcast.json"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
ROLE_SQL = ROOT / "deploy" / "compose" / "postgres" / "grafana-role.sql"

PROMETHEUS_UID = "bcast-prometheus"
POSTGRES_UID = "bcast-postgres"
POSTGRES_TYPE = "grafana-postgresql-datasource"
#: What every panel of the overview reads.
OVERVIEW_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

#: Gauges every scheduler sets alike, from the same tables: summed, two schedulers show
#: twice the truth. (Each process's own gauges, its heartbeat and last pass, are not here.)
TABLE_WIDE = frozenset(
    {
        "bcast_outbox_backlog",
        "bcast_outbox_oldest_age_seconds",
        "bcast_batches",
        "bcast_broadcasts_in_progress",
        "bcast_broadcasts_auto_paused",
        "bcast_delivery_partitions",
        "bcast_delivery_partitions_held",
    }
)
#: Label -> the variable that must filter it (with ``=~``: the variables take several values).
FILTERS = {"kind": "$kind", "channel": "$channel"}
#: Metrics of other programs the overview shows; they carry no bcast label.
FOREIGN = ("dramatiq_", "rabbitmq_")

AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
#: Grafana's template variable syntaxes ($name, [[name]], ${name}, ${name:format}).
_VARIABLE = re.compile(
    r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^\}]+))?(?::([^\}]+))?\}"
)
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"bool", "and", "or", "unless", "offset", "atan2"})


def load(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def variables(dashboard: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


# --- PromQL ----------------------------------------------------------------------------------


_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    |(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<range>\[[^\]]*\])
    |(?P<number>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
    |(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}])
    """,
    re.VERBOSE,
)


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) of each token of a PromQL expression, spaces left out."""
    found = []
    at = 0
    while at < len(expr):
        match = _TOKEN.match(expr, at)
        if match is None:
            raise ValueError(f"cannot read {expr[at:]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            found.append((kind, match.group()))
        at = match.end()
    return found


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text[1:-1])


@dataclass(frozen=True, slots=True)
class Selector:
    """One metric selector of an expression, and the calls around it."""

    metric: str
    #: (label, operator, value) of each matcher between the braces.
    matchers: tuple[tuple[str, str, str], ...]
    #: The functions and aggregations it sits in, innermost first.
    calls: tuple[str, ...]

    def aggregation(self) -> str | None:
        """The innermost aggregation over it (None: none)."""
        return next((c for c in self.calls if c in AGGREGATIONS), None)


def _matchers(toks: list[tuple[str, str]], at: int) -> tuple[tuple[tuple[str, str, str], ...], int]:
    if at >= len(toks) or toks[at][1] != "{":
        return (), at
    found = []
    at += 1
    while toks[at][1] != "}":
        (label_kind, label), (_, op), (value_kind, value) = toks[at : at + 3]
        if label_kind != "name" or op not in ("=", "!=", "=~", "!~") or value_kind != "string":
            raise ValueError(f"cannot read the matcher at {toks[at : at + 3]}")
        found.append((label, op, _unquote(value)))
        at += 3
        if toks[at][1] == ",":
            at += 1
    return tuple(found), at + 1


def _after_parens(toks: list[tuple[str, str]], at: int) -> int:
    """The index after the parenthesis that closes the one at ``at``."""
    depth = 0
    for i in range(at, len(toks)):
        depth += {"(": 1, ")": -1}.get(toks[i][1], 0)
        if depth == 0:
            return i + 1
    raise ValueError("unbalanced parentheses")


def selectors(expr: str) -> list[Selector]:
    """Every metric selector of a PromQL expression, with its matchers and enclosing calls."""
    toks = tokens(expr)
    found = []
    stack: list[str | None] = []
    pending: str | None = None
    at = 0
    while at < len(toks):
        kind, text = toks[at]
        following = toks[at + 1][1] if at + 1 < len(toks) else None
        if kind == "name" and text in _GROUPING:
            at = _after_parens(toks, at + 1) if following == "(" else at + 1
            continue
        if kind == "name" and text in _KEYWORDS:
            at += 1
            continue
        if kind == "name" and (
            following == "(" or (text in AGGREGATIONS and following in ("by", "without"))
        ):
            pending = text
            at += 1
            continue
        if kind == "name":
            matchers, at = _matchers(toks, at + 1)
            calls = tuple(name for name in reversed(stack) if name is not None)
            found.append(Selector(text, matchers, calls))
            continue
        if text == "{":
            raise ValueError(f"a selector without a metric name in {expr!r}")
        if text == "(":
            stack.append(pending)
            pending = None
        elif text == ")":
            stack.pop()
        at += 1
    if stack:
        raise ValueError(f"unbalanced parentheses in {expr!r}")
    return found


def metric_labels() -> dict[str, frozenset[str]]:
    """Every sample name bcast's registered metrics expose, with their label names."""
    return {
        name: frozenset(getattr(collector, "_labelnames", ()))
        for name, collector in REGISTRY._names_to_collectors.items()
    }


def filter_problems(expr: str, labels: Mapping[str, frozenset[str]]) -> list[str]:
    """Selectors of metrics with a ``kind``/``channel`` label not filtered on its variable."""
    problems = []
    for s in selectors(expr):
        if s.metric.startswith(FOREIGN):
            continue
        if s.metric not in labels:
            problems.append(f"{s.metric}: no metric bcast defines")
            continue
        for label, variable in FILTERS.items():
            wanted = {(label, "=~", variable), (label, "=~", "${" + variable[1:] + "}")}
            if label in labels[s.metric] and not wanted & set(s.matchers):
                problems.append(f'{s.metric}: not filtered by {label}=~"{variable}"')
    return problems


def aggregation_problems(expr: str) -> list[str]:
    """Selectors of table-wide scheduler gauges not taken as the max (or min) over processes."""
    return [
        f"{s.metric}: {s.aggregation() or 'no aggregation'}, not max over schedulers"
        for s in selectors(expr)
        if s.metric in TABLE_WIDE and s.aggregation() not in ("max", "min")
    ]


def prometheus_targets(dashboard: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, refId, expression) of every Prometheus query of a dashboard."""
    return [
        (p["title"], t["refId"], t["expr"])
        for p in panels(dashboard)
        for t in p.get("targets", [])
        if "expr" in t
    ]


def promql(expr: str, values: Mapping[str, str]) -> str:
    """An expression with its variables replaced as given (a regex: ``.*`` is what "All"
    sends), as Prometheus receives it. A ``$`` left over raises.
    """
    text = _VARIABLE.sub(
        lambda m: values.get(m.group(1) or m.group(2) or m.group(4), m.group(0)), expr
    )
    if "$" in text:
        raise ValueError(f"left unsubstituted: {text}")
    return text


# --- Postgres: Grafana's substitution ----------------------------------------------------------

#: Grafana's Postgres macros (pkg/tsdb/grafana-postgresql-datasource/macros.go): no ')' in
#: their arguments, split on commas.
_MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")
_INTERVAL = re.compile(r"^(\d+)(ms|s|m|h|d|w)$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _rfc3339(moment: datetime) -> str:
    """As Go's time.RFC3339Nano writes a UTC time (no trailing zeros, Z)."""
    text = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def _interval(text: str) -> float:
    match = _INTERVAL.match(text.strip("'"))
    if match is None:
        raise ValueError(f"not an interval Grafana reads: {text}")
    return int(match.group(1)) * _SECONDS[match.group(2)]


def _number(seconds: float) -> str:
    return str(int(seconds)) if seconds == int(seconds) else repr(seconds)


def grafana_sql(raw_sql: str, values: Mapping[str, str], start: datetime, end: datetime) -> str:
    """A panel's SQL as Grafana sends it to Postgres for the time range ``start``..``end``:
    single-valued variables (``$name``, ``${name}``, ``[[name]]``) replaced by their value with
    quotes doubled, as Grafana's SQL data sources do, then the macros expanded as the Postgres
    data source does (``$__timeFilter``, ``$__timeFrom``, ``$__timeTo``, ``$__timeGroup``,
    ``$__timeGroupAlias``, ``$__time``, ``$__timeEpoch``; fill values are Grafana's business
    and left out). A ``$`` left over (an unknown variable) or an unknown macro raises.
    """

    def variable(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(4)
        if name not in values:
            return m.group(0)
        return values[name].replace("'", "''")

    text = _VARIABLE.sub(variable, raw_sql)

    def macro(m: re.Match[str]) -> str:
        name, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        if name == "__timeGroup" and text[m.end() : m.end() + 1] == ",":
            name = "__timeGroupAlias"  # Grafana's reading of the pre-5.3 form
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{_rfc3339(start)}' AND '{_rfc3339(end)}'"
        if name == "__timeFrom":
            return f"'{_rfc3339(start)}'"
        if name == "__timeTo":
            return f"'{_rfc3339(end)}'"
        if name == "__time":
            return f'{args[0]} AS "time"'
        if name == "__timeEpoch":
            return f'extract(epoch from {args[0]}) as "time"'
        if name in ("__timeGroup", "__timeGroupAlias"):
            seconds = _number(_interval(args[1]))
            group = f"floor(extract(epoch from {args[0]})/{seconds})*{seconds}"
            return group + (' AS "time"' if name == "__timeGroupAlias" else "")
        raise ValueError(f"a macro this helper does not know: ${name}")

    text = _MACRO.sub(macro, text)
    if "$" in text:
        raise ValueError(f"left unsubstituted: {text}")
    return text


@dataclass(frozen=True, slots=True)
class SqlQuery:
    """One SQL query of a dashboard: a panel's target, or a query variable."""

    #: The panel's title, or ``variable <name>``.
    title: str
    ref_id: str
    raw_sql: str
    #: ``table`` or ``time_series`` (variables: ``table``).
    format: str


def dashboard_sql(dashboard: Mapping[str, Any]) -> list[SqlQuery]:
    """Every SQL query of a dashboard, its query variables' included."""
    found = [
        SqlQuery(f"variable {v['name']}", "", v["query"], "table")
        for v in variables(dashboard).values()
        if v["type"] == "query" and v["datasource"]["type"] == POSTGRES_TYPE
    ]
    found.extend(
        SqlQuery(p["title"], t["refId"], t["rawSql"], t.get("format", "table"))
        for p in panels(dashboard)
        for t in p.get("targets", [])
        if "rawSql" in t
    )
    return found


# --- the dashboards as files -----------------------------------------------------------------


def provisioned_datasources() -> dict[str, str]:
    """uid -> type of every provisioned data source."""
    found = {}
    for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.y*ml")):
        for source in yaml.safe_load(path.read_text())["datasources"]:
            found[source["uid"]] = source["type"]
    return found


def compose_grafana() -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    return service


@pytest.mark.parametrize("path", [OVERVIEW, BROADCAST], ids=lambda p: p.name)
def test_a_dashboard_has_unique_panel_ids_and_no_panels_over_each_other(path: Path) -> None:
    dashboard = load(path)
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    boxes = [(p["title"], p["gridPos"]) for p in dashboard["panels"]]
    for i, (title, a) in enumerate(boxes):
        assert a["x"] + a["w"] <= 24, title
        for other, b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, f"{title} lies over {other}"
    assert all(p.get("targets") for p in panels(dashboard))


@pytest.mark.parametrize("path", [OVERVIEW, BROADCAST], ids=lambda p: p.name)
def test_every_query_reads_a_datasource_variable_or_a_provisioned_datasource(path: Path) -> None:
    dashboard = load(path)
    provisioned = provisioned_datasources()
    chosen = {n: v["query"] for n, v in variables(dashboard).items() if v["type"] == "datasource"}
    readers = [(p["title"], p["datasource"]) for p in panels(dashboard)]
    readers += [(p["title"], t["datasource"]) for p in panels(dashboard) for t in p["targets"]]
    readers += [
        (f"variable {n}", v["datasource"])
        for n, v in variables(dashboard).items()
        if v["type"] == "query"
    ]
    assert readers
    for title, source in readers:
        uid = source["uid"]
        if uid.startswith("$"):
            name = uid.strip("${}")
            assert chosen.get(name) == source["type"], (
                f"{title}: {uid} is no {source['type']} choice"
            )
        else:
            assert provisioned.get(uid) == source["type"], f"{title}: {uid} is not provisioned"


def test_every_overview_panel_reads_the_chosen_prometheus() -> None:
    dashboard = load(OVERVIEW)
    for p in panels(dashboard):
        assert p["datasource"] == OVERVIEW_DATASOURCE, p["title"]
        assert all(t["datasource"] == OVERVIEW_DATASOURCE for t in p["targets"]), p["title"]


def test_every_broadcast_panel_reads_the_provisioned_postgres() -> None:
    postgres = {"type": POSTGRES_TYPE, "uid": POSTGRES_UID}
    dashboard = load(BROADCAST)
    assert variables(dashboard)["broadcast"]["datasource"] == postgres
    for p in panels(dashboard):
        assert p["datasource"] == postgres, p["title"]
        assert all(t["datasource"] == postgres for t in p["targets"]), p["title"]


def test_the_overview_variables() -> None:
    found = variables(load(OVERVIEW))
    assert list(found) == ["datasource", "channel", "kind"]
    source = found["datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    assert source["current"]["value"] == PROMETHEUS_UID
    assert provisioned_datasources()[PROMETHEUS_UID] == "prometheus"
    for name, query in (
        ("channel", "label_values(bcast_channel_sends_total, channel)"),
        ("kind", "label_values(bcast_deliveries_total, kind)"),
    ):
        v = found[name]
        assert v["type"] == "query"
        assert v["datasource"] == OVERVIEW_DATASOURCE
        assert v["query"]["query"] == v["definition"] == query
        assert (v["multi"], v["includeAll"], v["allValue"]) == (True, True, ".*")
        metric, label = query[len("label_values(") : -1].split(", ")
        assert label in metric_labels()[metric]


def test_every_expression_on_a_kind_or_channel_metric_filters_on_the_variables() -> None:
    labels = metric_labels()
    targets = prometheus_targets(load(OVERVIEW))
    problems = [
        f"{title} {ref}: {problem}"
        for title, ref, expr in targets
        for problem in filter_problems(expr, labels)
    ]
    assert problems == []
    # Not vacuous: the check saw the selectors it is about.
    found = [s for _, _, expr in targets for s in selectors(expr)]
    filtered = {s.metric for s in found if labels.get(s.metric, frozenset()) & set(FILTERS)}
    assert len(filtered) >= 10, filtered
    assert "bcast_channel_deliveries_total" in filtered


def test_the_filter_check_catches_each_filter_taken_out() -> None:
    """Every ``kind``/``channel`` filter of the overview, taken out alone, is reported."""
    labels = metric_labels()
    taken_out = 0
    for title, ref, expr in prometheus_targets(load(OVERVIEW)):
        for label, variable in FILTERS.items():
            matcher = f'{label}=~"{variable}"'
            for m in re.finditer(re.escape(matcher), expr):
                cut = expr[: m.start()] + expr[m.end() :]
                cut = cut.replace("{,", "{").replace(",}", "}").replace(",,", ",")
                assert filter_problems(cut, labels), f"{title} {ref} without {matcher}: {cut}"
                taken_out += 1
    assert taken_out >= 20


@pytest.mark.parametrize(
    "expr",
    [
        "sum(rate(bcast_deliveries_total[1m]))",
        'sum(rate(bcast_deliveries_total{outcome="sent"}[1m]))',
        'sum(rate(bcast_deliveries_total{kind="$kind"}[1m]))',
        'sum by (channel) (rate(bcast_channel_sends_total{kind=~"$kind"}[1m]))',
        'sum by (channel) (rate(bcast_channel_sends_total{channel=~"$channel"}[1m]))',
        'sum(rate(bcast_channel_sends_total{channel=~"$channel",kind=~"$kind"}[1m])) / '
        "clamp_min(sum(rate(bcast_channel_sends_total[1m])), 1e-9)",
        "histogram_quantile(0.95, sum by (le, kind) (rate(bcast_provider_request_duration_seconds_bucket[1m])))",
        'sum by (channel, kind) (rate(bcast_channel_deliveries_total{outcome="failed"}[1m]))',
        "sum(rate(bcast_no_such_metric_total[1m]))",
    ],
)
def test_the_filter_check_catches_a_missing_filter(expr: str) -> None:
    assert filter_problems(expr, metric_labels())


@pytest.mark.parametrize(
    "expr",
    [
        "sum(bcast_outbox_backlog)",
        "bcast_outbox_oldest_age_seconds",
        "sum by (state) (bcast_batches)",
        "avg(bcast_broadcasts_in_progress)",
        "sum(max_over_time(bcast_delivery_partitions_held[5m]))",
        "max(bcast_outbox_backlog) + sum(bcast_outbox_backlog)",
    ],
)
def test_the_aggregation_check_catches_a_sum_over_schedulers(expr: str) -> None:
    assert aggregation_problems(expr)


@pytest.mark.parametrize(
    "expr",
    [
        "max(bcast_outbox_backlog)",
        "max by (state) (bcast_batches)",
        "sum(max by (state) (bcast_batches))",
        "max(bcast_outbox_oldest_age_seconds) > 60",
    ],
)
def test_the_aggregation_check_takes_a_max(expr: str) -> None:
    assert aggregation_problems(expr) == []


def test_table_wide_gauges_are_never_summed_and_all_shown() -> None:
    targets = prometheus_targets(load(OVERVIEW))
    problems = [f"{t} {r}: {p}" for t, r, e in targets for p in aggregation_problems(e)]
    assert problems == []
    shown = {s.metric for _, _, expr in targets for s in selectors(expr)}
    assert shown >= TABLE_WIDE
    outbox = [e for t, _, e in targets if t.startswith("Outbox")]
    assert outbox == ["max(bcast_outbox_backlog)", "max(bcast_outbox_oldest_age_seconds)"]


def test_table_wide_gauges_are_the_schedulers_gauges_but_its_own_clocks() -> None:
    """A new scheduler gauge must be placed: table-wide (max) or the process's own."""
    gauges = {
        value._name
        for module in (services.scheduler.scheduler, services.scheduler.partitions)
        for value in vars(module).values()
        if isinstance(value, Gauge)
    }
    own = {g for g in gauges if g.endswith("_timestamp_seconds")}
    assert gauges - own == TABLE_WIDE


ALL = {"kind": ".*", "channel": ".*"}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: bash deploy/local/services.sh installs it"
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_every_overview_expression_is_promql(tmp_path: Path) -> None:
    """With every variable at All, each expression parses (``promtool check rules``)."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": promql(expr, ALL)}
        for i, (_, _, expr) in enumerate(prometheus_targets(load(OVERVIEW)))
    ]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
    done = promtool("check", "rules", "rules.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(rules)} rules found" in done.stdout


def test_the_outbox_and_failure_ratio_panels_on_two_schedulers(tmp_path: Path) -> None:
    """The overview's own expressions evaluated by promtool: two schedulers report the same
    outbox, which shows once; a channel failing half its sends shows 0.5, one sending
    nothing 0, and the channel variable keeps to the channel chosen.
    """
    exprs = {title: expr for title, _, expr in prometheus_targets(load(OVERVIEW))}
    outbox = [e for t, _, e in prometheus_targets(load(OVERVIEW)) if t.startswith("Outbox")]
    ratio = exprs["Channel: failure ratio"]
    series = [
        ('bcast_outbox_backlog{instance="s1"}', "7x10"),
        ('bcast_outbox_backlog{instance="s2"}', "7x10"),
        ('bcast_outbox_oldest_age_seconds{instance="s1"}', "0+60x10"),
        ('bcast_outbox_oldest_age_seconds{instance="s2"}', "0+60x10"),
    ]
    for channel, kind, sent, failed in (
        ("1", "webhook", 30, 30),
        ("2", "smtp", 60, 0),
        ("3", "smtp", 0, 0),
    ):
        for outcome, per_minute in (
            ("sent", sent),
            ("failed", failed),
            ("partial", 0),
            ("retry", 5),
        ):
            labels = f'channel="{channel}",kind="{kind}",outcome="{outcome}"'
            series.append((f"bcast_channel_deliveries_total{{{labels}}}", f"0+{per_minute}x10"))

    def sample(value: float, **labels: str) -> dict[str, Any]:
        return {
            "labels": "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}",
            "value": value,
        }

    cases = [
        (promql(outbox[0], ALL), [sample(7)]),
        (promql(outbox[1], ALL), [sample(600)]),
        (
            promql(ratio, ALL),
            [
                sample(0.5, channel="1", kind="webhook"),
                sample(0, channel="2", kind="smtp"),
                sample(0, channel="3", kind="smtp"),
            ],
        ),
        (promql(ratio, {"channel": "1", "kind": ".*"}), [sample(0.5, channel="1", kind="webhook")]),
        (
            promql(ratio, {"channel": ".*", "kind": "smtp"}),
            [sample(0, channel="2", kind="smtp"), sample(0, channel="3", kind="smtp")],
        ),
    ]
    test = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series],
                "promql_expr_test": [
                    {"expr": expr, "eval_time": "10m", "exp_samples": samples}
                    for expr, samples in cases
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    done = promtool("test", "rules", "test.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_parser_reads_selectors_and_their_calls() -> None:
    [a, b] = selectors(
        'sum by (channel) (rate(bcast_channel_slot_wait_seconds_total{channel=~"$channel",'
        'kind=~"$kind"}[1m])) / on (channel) group_left clamp_min(max without (kind) '
        '(bcast_channel_sends_total{queue=~"bcast_.*\\\\.XQ"}), 1e-9)'
    )
    assert a == Selector(
        "bcast_channel_slot_wait_seconds_total",
        (("channel", "=~", "$channel"), ("kind", "=~", "$kind")),
        ("rate", "sum"),
    )
    assert b == Selector(
        "bcast_channel_sends_total", (("queue", "=~", "bcast_.*\\.XQ"),), ("max", "clamp_min")
    )


def test_provisioning_loads_both_dashboards_and_their_datasources() -> None:
    [provider] = yaml.safe_load((GRAFANA / "provisioning/dashboards/bcast.yml").read_text())[
        "providers"
    ]
    mounts = {}
    for volume in compose_grafana()["volumes"]:
        source, target = volume.rsplit(":", 1)[0].split(":", 1)
        mounts[source] = target
    assert mounts["../grafana/dashboards"] == provider["options"]["path"]
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    files = sorted(DASHBOARDS.glob("*.json"))
    assert {OVERVIEW, BROADCAST} <= set(files)
    uids = [load(f)["uid"] for f in files]
    assert len(uids) == len(set(uids))
    assert load(BROADCAST)["uid"] == "bcast-broadcast"
    assert provisioned_datasources() == {
        PROMETHEUS_UID: "prometheus",
        POSTGRES_UID: POSTGRES_TYPE,
    }


def test_the_postgres_datasource_takes_its_settings_from_grafanas_environment() -> None:
    path = GRAFANA / "provisioning/datasources/postgres.yml"
    [source] = yaml.safe_load(path.read_text())["datasources"]
    text = path.read_text()
    used = set(re.findall(r"\$\{?(BCAST_GRAFANA_PG_[A-Z_]+)", text))
    assert used == {
        f"BCAST_GRAFANA_PG_{n}" for n in ("HOST", "USER", "PASSWORD", "DATABASE", "SSLMODE")
    }
    assert source["user"] == "$BCAST_GRAFANA_PG_USER"
    assert source["jsonData"]["database"] == "$BCAST_GRAFANA_PG_DATABASE"
    assert source["secureJsonData"]["password"] == "$BCAST_GRAFANA_PG_PASSWORD"
    environment = compose_grafana()["environment"]
    assert used <= set(environment)
    # compose's default is the documented read-only role, never bcast's own user.
    assert environment["BCAST_GRAFANA_PG_USER"] == "${BCAST_GRAFANA_PG_USER:-bcast_grafana}"


# --- the per-broadcast dashboard against Postgres --------------------------------------------


def test_grafana_sql_substitutes_as_grafana_does() -> None:
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    end = start + timedelta(minutes=5, microseconds=250000)
    got = grafana_sql(
        "SELECT $__timeGroupAlias(t, '10s', 0), $__timeGroup(t, '1m') FROM x "
        "WHERE $__timeFilter(t) AND id = '$b' AND n = '${b}' AND $__timeFrom() < now()",
        {"b": "o'brien"},
        start,
        end,
    )
    assert got == (
        'SELECT floor(extract(epoch from t)/10)*10 AS "time", '
        "floor(extract(epoch from t)/60)*60 FROM x "
        "WHERE t BETWEEN '2026-01-02T03:04:05Z' AND '2026-01-02T03:09:05.25Z' "
        "AND id = 'o''brien' AND n = 'o''brien' AND '2026-01-02T03:04:05Z' < now()"
    )
    with pytest.raises(ValueError, match="unsubstituted"):
        grafana_sql("SELECT '$other'", {"b": "1"}, start, end)
    with pytest.raises(ValueError, match="does not know"):
        grafana_sql("SELECT $__unixEpochFilter(t)", {}, start, end)


#: What the finished broadcast's recipients did: status, last error, seconds after ``base``
#: when their row was finished.
FINISHED = [
    ("sent", None, 1),
    ("sent", None, 2),
    ("failed", "provider said 503", 3),
    ("sent", None, 15),
    ("failed", "provider said 503", 16),
    ("failed", "address rejected", 31),
    ("partial", "cut short after 1 of 2 parts", 32),
    ("skipped", "skipped: contact opted out", 40),
]
#: The broadcast still being sent, filed under the same day.
SENDING = [("sent", None), ("queued", None), ("failed", "timeout"), ("canceled", None)]


@dataclass
class Broadcasts:
    finished: int
    sending: int
    #: (contact id, address) of the workspace's contacts, in id order (the rows' order).
    contacts: list[tuple[int, str]]
    part_day: date
    #: A multiple of 10 s in the past, before every row of the finished broadcast was done.
    base: datetime
    #: The finished broadcast's channel: "name (#id, kind)".
    channel: str
    partition: str


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as c:
        yield c


@pytest.fixture
def grafana_role(conn: psycopg.Connection[Any], database_url: str) -> Iterator[str]:
    """The read-only role deploy/compose/postgres/grafana-role.sql creates (compose's
    grafana-role service runs it), made by that file (under a name of its own for this test,
    in this test's database; twice: it is safe to run again), dropped afterwards.
    """
    role = f"bcast_grafana_test_{secrets.token_hex(4)}"
    script = ROLE_SQL.read_text().replace("bcast_grafana", role)
    assert role in script
    try:
        for _ in range(2):
            conn.execute(script.encode())
        yield role
    finally:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def broadcasts(api: Api, conn: psycopg.Connection[Any]) -> Broadcasts:
    """A completed broadcast (sent, failed, partial and skipped rows, finished at known times,
    one batch done) and one in progress, in a workspace of their own.
    """
    channel = api.channel()
    account = api.account(channel["id"])
    contacts = [
        (int(r[0]), str(r[1]))
        for r in conn.execute(
            "INSERT INTO contact (workspace_id, account_id, address) "
            "SELECT %s, %s, 'https://hooks.example/' || i FROM generate_series(1, %s) AS i "
            "ORDER BY i RETURNING id, address",
            (api.workspace_id, account["id"], len(FINISHED)),
        ).fetchall()
    ]
    contacts.sort()
    finished = api.broadcast(channel["id"], name="spring sale")["id"]
    sending = api.broadcast(channel["id"], name="o'brien's news")["id"]
    ids = start_with_deliveries(
        finished, [s for s, _, _ in FINISHED], errors=[e for _, e, _ in FINISHED]
    )
    start_with_deliveries(sending, [s for s, _ in SENDING], errors=[e for _, e in SENDING])

    now = conn.execute("SELECT now()").fetchone()
    assert now is not None
    base = datetime.fromtimestamp(math.floor(now[0].timestamp() / 10) * 10 - 600, UTC)
    for row_id, (_, _, after) in zip(ids, FINISHED, strict=True):
        at = base + timedelta(seconds=after)
        conn.execute(
            "UPDATE delivery SET updated_at = %s, "
            "sent_at = CASE WHEN status IN ('sent', 'partial') THEN %s END WHERE id = %s",
            (at, at, row_id),
        )
    # Its last row was finished: the snapshot being marked taken completes it.
    conn.execute("UPDATE broadcast SET snapshot_at = now() WHERE id = %s", (finished,))
    row = conn.execute(
        "SELECT status, part_day FROM broadcast WHERE id = %s", (finished,)
    ).fetchone()
    assert row is not None
    assert row[0] == "completed"
    part_day = row[1]
    for broadcast, state, runs, due in (
        (finished, "done", 2, "now()"),
        (sending, "ready", 0, "now() + interval '1 minute'"),
    ):
        conn.execute(
            "INSERT INTO delivery_batch (workspace_id, broadcast_id, part_day, first_id, last_id, "
            f"state, runs, due_at) VALUES (%s, %s, %s, 0, 0, %s, %s, {due})",
            (api.workspace_id, broadcast, part_day, state, runs),
        )
    [(partition,)] = conn.execute(
        "SELECT DISTINCT tableoid::regclass::text FROM delivery WHERE broadcast_id = %s",
        (finished,),
    ).fetchall()
    name = f"{channel['name']} (#{channel['id']}, {channel['kind']})"
    return Broadcasts(finished, sending, contacts, part_day, base, name, str(partition))


def run(
    conn: psycopg.Connection[Any],
    raw_sql: str,
    broadcast: int,
    start: datetime,
    end: datetime,
    *,
    role: str | None = None,
) -> list[dict[str, Any]]:
    """A dashboard query's rows, by column, as Grafana would get them (read-only)."""
    text = grafana_sql(raw_sql, {"broadcast": str(broadcast)}, start, end)
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        if role is not None:
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
        cur = conn.execute(text)
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _plan_nodes(plan: Any) -> Iterator[dict[str, Any]]:
    if isinstance(plan, dict):
        if "Node Type" in plan:
            yield plan
        for value in plan.values():
            yield from _plan_nodes(value)
    elif isinstance(plan, list):
        for value in plan:
            yield from _plan_nodes(value)


def test_every_query_runs_read_only_on_indexes_in_one_partition(
    conn: psycopg.Connection[Any], broadcasts: Broadcasts, grafana_role: str
) -> None:
    """As the documented role, in a read-only transaction, with sequential scans priced out (an
    index the query can use is taken): no sequential scan, and of delivery's partitions only
    the broadcast's is read (the others are pruned while the query runs).
    """
    queries = dashboard_sql(load(BROADCAST))
    assert len(queries) == 1 + len(panels(load(BROADCAST)))
    start, end = broadcasts.base - timedelta(hours=1), datetime.now(UTC) + timedelta(hours=1)
    partitions = {
        str(r[0])
        for r in conn.execute(
            "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'delivery'::regclass"
        ).fetchall()
    }
    assert len(partitions) >= 2
    for broadcast in (broadcasts.finished, broadcasts.sending):
        for query in queries:
            text = grafana_sql(query.raw_sql, {"broadcast": str(broadcast)}, start, end)
            with conn.transaction():
                conn.execute("SET TRANSACTION READ ONLY")
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(grafana_role)))
                conn.execute("SET LOCAL enable_seqscan = off")
                row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + text).fetchone()
            assert row is not None
            nodes = list(_plan_nodes(row[0]))
            seq = [n.get("Relation Name") for n in nodes if n["Node Type"] == "Seq Scan"]
            assert seq == [], f"{query.title}: sequential scan of {seq}"
            read = {
                n["Relation Name"]
                for n in nodes
                if n.get("Relation Name") in partitions and n.get("Actual Loops", 0) > 0
            }
            if re.search(r"\bFROM delivery\b", query.raw_sql):
                assert read == {broadcasts.partition}, query.title
            else:
                assert read == set(), query.title


def by_title(title: str) -> str:
    [query] = [q.raw_sql for q in dashboard_sql(load(BROADCAST)) if q.title == title]
    return query


def test_every_panel_answers_what_the_rows_say(
    conn: psycopg.Connection[Any], broadcasts: Broadcasts, grafana_role: str
) -> None:
    b = broadcasts
    start, end = b.base - timedelta(minutes=1), datetime.now(UTC) + timedelta(minutes=1)
    answers: dict[str, list[dict[str, Any]]] = {
        q.title: run(conn, q.raw_sql, b.finished, start, end, role=grafana_role)
        for q in dashboard_sql(load(BROADCAST))
    }
    row = conn.execute(
        "SELECT audience_size, started_at, finished_at, created_at, send_at, workspace_id "
        "FROM broadcast WHERE id = %s",
        (b.finished,),
    ).fetchone()
    assert row is not None
    audience, started, finished, created, send_at, workspace = row
    assert started is not None
    assert finished is not None

    assert answers.pop("Status") == [{"status": "completed"}]
    assert answers.pop("Recipients") == [
        {
            "audience": audience,
            "total": 8,
            "queued": 0,
            "sent": 3,
            "failed": 3,
            "partial": 1,
            "canceled": 0,
            "skipped": 1,
        }
    ]
    assert answers.pop("Done") == [{"done": 1.0}]
    [summary] = answers.pop("Broadcast")
    assert summary.pop("from_ms") < started.timestamp() * 1000 < finished.timestamp() * 1000
    assert summary.pop("to_ms") > finished.timestamp() * 1000
    assert summary == {
        "id": b.finished,
        "name": "spring sale",
        "status": "completed",
        "status reason": None,
        "channel": b.channel,
        "origin": "broadcast",
        "workspace": workspace,
        "created": created,
        "send at": send_at,
        "started": started,
        "finished": finished,
        "filed under": b.part_day,
        "rows removed": None,
    }

    def bucket(seconds: int) -> float:
        return (b.base + timedelta(seconds=seconds)).timestamp()

    progress = [
        {**r, "time": float(r["time"])}
        for r in answers.pop("Progress: recipients finished per 10 s")
    ]
    assert progress == [
        {"time": bucket(0), "sent": 2, "failed": 1, "partial": 0},
        {"time": bucket(10), "sent": 1, "failed": 1, "partial": 0},
        {"time": bucket(30), "sent": 0, "failed": 1, "partial": 1},
    ]
    assert answers.pop("Batches") == [
        {
            "state": "done",
            "batches": 1,
            "runs": 2,
            "next due": None,
            "queued since": None,
            "first lease ends": None,
        }
    ]
    assert answers.pop("Why recipients were not reached (top 20)") == [
        {"reason": "provider said 503", "recipients": 2, "failed": 2, "partial": 0, "skipped": 0},
        {"reason": "address rejected", "recipients": 1, "failed": 1, "partial": 0, "skipped": 0},
        {
            "reason": "cut short after 1 of 2 parts",
            "recipients": 1,
            "failed": 0,
            "partial": 1,
            "skipped": 0,
        },
        {
            "reason": "skipped: contact opted out",
            "recipients": 1,
            "failed": 0,
            "partial": 0,
            "skipped": 1,
        },
    ]
    not_reached = answers.pop("Recipients not reached (first 500)")
    for r in not_reached:
        assert r.pop("last change") is not None
    rows = list(zip(b.contacts, FINISHED, strict=True))
    expected = [
        {
            "contact": contact,
            "address": address,
            "status": status,
            "last error": error,
            "attempts": 1,
        }
        for wanted in ("failed", "partial", "skipped", "canceled")
        for (contact, address), (status, error, _) in rows
        if status == wanted
    ]
    assert not_reached == expected
    assert [r["status"] for r in not_reached] == ["failed"] * 3 + ["partial", "skipped"]

    offered = answers.pop("variable broadcast")
    ours = [o for o in offered if o["__value"] in (b.finished, b.sending)]
    assert ours == [
        {"__value": b.sending, "__text": f"o'brien's news (#{b.sending})"},
        {"__value": b.finished, "__text": f"spring sale (#{b.finished})"},
    ]
    assert [o["__value"] for o in offered] == sorted((o["__value"] for o in offered), reverse=True)
    assert answers == {}, "a panel without a check of its answer"


def test_a_broadcast_being_sent(conn: psycopg.Connection[Any], broadcasts: Broadcasts) -> None:
    b = broadcasts
    start, end = b.base, datetime.now(UTC) + timedelta(minutes=1)

    def answer(title: str) -> list[dict[str, Any]]:
        return run(conn, by_title(title), b.sending, start, end)

    assert answer("Status") == [{"status": "in_progress"}]
    [counts] = answer("Recipients")
    assert {k: v for k, v in counts.items() if k != "audience"} == {
        "total": 4,
        "queued": 1,
        "sent": 1,
        "failed": 1,
        "partial": 0,
        "canceled": 1,
        "skipped": 0,
    }
    assert answer("Done") == [{"done": 0.75}]
    [summary] = answer("Broadcast")
    assert (summary["name"], summary["status"], summary["finished"]) == (
        "o'brien's news",
        "in_progress",
        None,
    )
    [progress] = answer("Progress: recipients finished per 10 s")
    assert (progress["sent"], progress["failed"], progress["partial"]) == (1, 1, 0)
    [batch] = answer("Batches")
    assert (batch["state"], batch["batches"], batch["runs"]) == ("ready", 1, 0)
    assert batch["next due"] > datetime.now(UTC)
    assert answer("Why recipients were not reached (top 20)") == [
        {"reason": "timeout", "recipients": 1, "failed": 1, "partial": 0, "skipped": 0}
    ]
    assert [
        (r["contact"], r["status"], r["last error"])
        for r in answer("Recipients not reached (first 500)")
    ] == [(b.contacts[2][0], "failed", "timeout"), (b.contacts[3][0], "canceled", CANCELED_REASON)]


def test_the_progress_panel_keeps_to_the_time_range(
    conn: psycopg.Connection[Any], broadcasts: Broadcasts
) -> None:
    b = broadcasts
    progress = by_title("Progress: recipients finished per 10 s")
    middle = run(
        conn, progress, b.finished, b.base + timedelta(seconds=10), b.base + timedelta(seconds=25)
    )
    assert [(float(r["time"]), r["sent"], r["failed"]) for r in middle] == [
        ((b.base + timedelta(seconds=10)).timestamp(), 1, 1)
    ]
    long_before = b.base - timedelta(days=1)
    assert run(conn, progress, b.finished, long_before, long_before + timedelta(hours=1)) == []


def test_no_broadcast_chosen_shows_nothing(conn: psycopg.Connection[Any]) -> None:
    """Before any broadcast exists the variable is empty: every panel is empty, none fails."""
    end = datetime.now(UTC)
    start = end - timedelta(hours=1)
    for query in dashboard_sql(load(BROADCAST)):
        if query.title.startswith("variable"):
            continue
        text = grafana_sql(query.raw_sql, {"broadcast": ""}, start, end)
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            assert conn.execute(text).fetchall() == [], query.title
