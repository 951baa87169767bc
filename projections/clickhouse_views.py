"""The analysts' views and named reports over the ClickHouse ``events`` table.

The SQL is checked in: ``sql/views.sql`` (views, created by the projector at start)
and ``sql/reports/<file>.sql`` (one SELECT per report). Reports carry placeholders
that one function fills for every consumer, so the CLI, the gateway's dashboard and
Grafana run the same SQL:

``{database}``, ``{tenant}`` (a string literal; ``''`` = every tenant), ``{since}`` and
``{until}`` (DateTime64 expressions, ``until`` exclusive), ``{bucket}`` (an interval
unit, fixed per report).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Protocol

DAY_MS = 86_400_000
_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": DAY_MS, "w": 7 * DAY_MS}


@dataclass(frozen=True, slots=True)
class Report:
    name: str
    file: str
    title: str
    chart: str  # "line" (x = time) or "bar" (x = labels)
    label: tuple[str, ...]  # the columns naming a bar (or the time column of a line)
    values: tuple[str, ...]  # numeric columns drawn
    series: str = ""  # a column splitting lines (volume: channel)
    tokens: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # columns a bar's tooltip adds (on another scale: bytes)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "title_zh": TITLES_ZH.get(self.name, self.title),
            "chart": self.chart,
            "label": list(self.label),
            "values": list(self.values),
            "series": self.series,
            "notes": list(self.notes),
        }


# The dashboard's Chinese titles (the page shows Chinese where the browser asks for it).
TITLES_ZH = {
    "volume-minute": "各渠道每分钟消息数",
    "volume-hour": "各渠道每小时消息数",
    "volume-day": "各渠道每日消息数",
    "first-response": "首次响应时间（秒）：按渠道、团队、客服",
    "resolution": "解决时间（秒）：按渠道、团队、客服",
    "deflection": "AI 拦截率（无人工介入即关闭）",
    "handoff-rate": "各渠道转人工率",
    "handoff-reasons": "转人工原因",
    "moderation": "各类别审核命中",
    "utilisation": "客服利用率",
    "csat": "满意度分布",
    "sla-breaches": "SLA 超时：按类型和优先级",
    "attachments": "各渠道、类型的附件（收 / 发）",
    "attachments-day": "每日附件：按租户、渠道、类型（收 / 发）",
}

REPORTS: dict[str, Report] = {
    r.name: r
    for r in (
        Report(
            "volume-minute",
            "volume",
            "Messages per channel per minute",
            "line",
            ("time",),
            ("messages_in", "messages_out"),
            "channel",
            {"bucket": "minute"},
        ),
        Report(
            "volume-hour",
            "volume",
            "Messages per channel per hour",
            "line",
            ("time",),
            ("messages_in", "messages_out"),
            "channel",
            {"bucket": "hour"},
        ),
        Report(
            "volume-day",
            "volume",
            "Messages per channel per day",
            "line",
            ("time",),
            ("messages_in", "messages_out"),
            "channel",
            {"bucket": "day"},
        ),
        Report(
            "first-response",
            "first-response",
            "First-response time (s) per channel, team, agent",
            "bar",
            ("dimension", "key"),
            ("p50_s", "p90_s"),
        ),
        Report(
            "resolution",
            "resolution",
            "Resolution time (s) per channel, team, agent",
            "bar",
            ("dimension", "key"),
            ("p50_s", "p90_s"),
        ),
        Report(
            "deflection",
            "deflection",
            "AI deflection rate (closed with no human)",
            "bar",
            ("channel",),
            ("deflection_rate",),
        ),
        Report(
            "handoff-rate",
            "handoff-rate",
            "Handoff rate per channel",
            "bar",
            ("channel",),
            ("handoff_rate",),
        ),
        Report(
            "handoff-reasons",
            "handoff-reasons",
            "Handoffs by reason",
            "bar",
            ("reason", "direction"),
            ("handoffs",),
        ),
        Report(
            "moderation",
            "moderation",
            "Moderation hits by category",
            "bar",
            ("category", "verdict", "direction"),
            ("hits",),
        ),
        Report(
            "utilisation",
            "utilisation",
            "Agent utilisation",
            "bar",
            ("agent",),
            ("utilisation",),
        ),
        Report("csat", "csat", "CSAT distribution", "bar", ("rating",), ("responses",)),
        Report(
            "sla-breaches",
            "sla-breaches",
            "SLA breaches by kind and priority",
            "bar",
            ("kind", "priority"),
            ("breaches",),
        ),
        Report(
            "attachments",
            "attachments",
            "Attachments per channel and type (in / out)",
            "bar",
            ("direction", "channel", "kind"),
            ("attachments",),
            notes=("bytes", "messages"),
        ),
        Report(
            "attachments-day",
            "attachments-day",
            "Attachments per day, tenant, channel and type (in / out)",
            "bar",
            ("day", "tenant", "direction", "channel", "kind"),
            ("attachments",),
            notes=("bytes", "messages"),
        ),
    )
}
# What the dashboard page shows, in order (one volume chart: the hourly one).
DASHBOARD = (
    "volume-minute",
    "first-response",
    "resolution",
    "deflection",
    "handoff-rate",
    "handoff-reasons",
    "moderation",
    "utilisation",
    "csat",
    "attachments",
)


def _sql_file(*parts: str) -> str:
    path = resources.files("projections") / "sql"
    for part in parts:
        path = path / part
    return path.read_text("utf-8")


def view_statements(database: str) -> list[str]:
    """``CREATE OR REPLACE VIEW`` statements, in dependency order."""
    text = _sql_file("views.sql").replace("{database}", database)
    statements = [s.strip() for s in re.split(r"^;\s*$", text, flags=re.MULTILINE)]
    return [s for s in statements if _strip_comments(s)]


def _strip_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.strip().startswith("--"))


def quote(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ms(value: int) -> str:
    return f"fromUnixTimestamp64Milli(toInt64({int(value)}), 'UTC')"


def template(name: str) -> str:
    """A report's SQL with its placeholders still in."""
    try:
        report = REPORTS[name]
    except KeyError:
        raise KeyError(f"no report {name!r}; reports: {', '.join(REPORTS)}") from None
    sql = _sql_file("reports", f"{report.file}.sql")
    for token, value in report.tokens.items():
        sql = sql.replace("{" + token + "}", value)
    return sql


def render(name: str, database: str, tenant: str, since_ms: int, until_ms: int) -> str:
    """A report's SQL for one tenant (``""``: all) and window."""
    return (
        template(name)
        .replace("{database}", database)
        .replace("{tenant}", quote(tenant))
        .replace("{since}", _ms(since_ms))
        .replace("{until}", _ms(until_ms))
    )


def parse_since(text: str, now_ms: int | None = None) -> int:
    """``7d``, ``12h``, ``30m``, ``2w``, ``90s`` before now, or epoch ms, or an ISO date."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    match = _DURATION.match(text)
    if match:
        return now - int(match.group(1)) * _UNIT_MS[match.group(2)]
    return parse_time(text)


def parse_time(text: str) -> int:
    """Epoch ms, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    import datetime

    stripped = text.strip()
    if stripped.isdigit():
        return int(stripped)
    try:
        moment = datetime.datetime.fromisoformat(stripped.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use 7d, 12h, epoch ms or ISO 8601)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


class QueryResultLike(Protocol):
    @property
    def columns(self) -> list[str]: ...

    @property
    def rows(self) -> list[list[Any]]: ...


class ReportRunner:
    """Runs named reports through any ``sql -> result`` function: the CLI's and the
    gateway's (the dashboard) are both this, over ``AnalyticsClient.query``."""

    def __init__(self, query: Callable[..., QueryResultLike], database: str) -> None:
        # ``query(sql)`` for reports, ``query(sql, parameters)`` for ``select``.
        self._query = query
        self._database = database

    def catalogue(self) -> list[dict[str, Any]]:
        return [REPORTS[name].describe() for name in DASHBOARD]

    def run(
        self, name: str, tenant: str, since_ms: int, until_ms: int
    ) -> tuple[list[str], list[list[Any]]]:
        result = self._query(render(name, self._database, tenant, since_ms, until_ms))
        return result.columns, result.rows

    def select(self, sql: str, parameters: Mapping[str, str]) -> tuple[list[str], list[list[Any]]]:
        """A read-only query of another reader (the agent console's search and customer
        profile): ``{database}`` is this runner's; every value is a ``{name:Type}``
        placeholder in ``parameters``, bound by ClickHouse, never spliced into the SQL."""
        result = self._query(sql.replace("{database}", self._database), parameters)
        return result.columns, result.rows


# --- Grafana: the same SQL, with Grafana's time range and a tenant variable ---------

_DATASOURCE = {"type": "grafana-clickhouse-datasource", "uid": "kefu-clickhouse"}


def grafana_sql(name: str, database: str = "kefu") -> str:
    return (
        template(name)
        .replace("{database}", database)
        .replace("{tenant}", "'${tenant}'")
        .replace("{since}", "fromUnixTimestamp64Milli(toInt64($__from), 'UTC')")
        .replace("{until}", "fromUnixTimestamp64Milli(toInt64($__to), 'UTC')")
    )


def grafana_dashboard(database: str = "kefu") -> dict[str, Any]:
    """The provisioned dashboard (deploy/grafana/dashboards/kefu-overview.json)."""
    panels: list[dict[str, Any]] = []
    names = ("volume-hour", *DASHBOARD[1:])
    for index, name in enumerate(names):
        report = REPORTS[name]
        line = report.chart == "line"
        panels.append(
            {
                "id": index + 1,
                "type": "timeseries" if line else "barchart",
                "title": report.title,
                "description": f"kefu analytics report {name!r} (projections/sql/reports/"
                f"{report.file}.sql)",
                "gridPos": {
                    "x": 0 if index % 2 == 0 else 12,
                    "y": (index // 2) * 9,
                    "w": 12,
                    "h": 9,
                },
                "datasource": _DATASOURCE,
                "targets": [
                    {
                        "refId": "A",
                        "datasource": _DATASOURCE,
                        "editorType": "sql",
                        "queryType": "timeseries" if line else "table",
                        "format": 0 if line else 1,
                        "rawSql": grafana_sql(name, database),
                    }
                ],
                "fieldConfig": {"defaults": {}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
                if line
                else {"xField": report.label[-1], "showValue": "auto"},
            }
        )
    return {
        "uid": "kefu-overview",
        "title": "kefu analytics",
        "description": "Generated by `python -m projections.clickhouse_views grafana` from "
        "projections/sql/reports: the same SQL as `kefu analytics report` and /dashboard.",
        "tags": ["kefu"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 2,
        "editable": False,
        "refresh": "30s",
        "time": {"from": "now-24h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "tenant",
                    "label": "tenant (empty: all)",
                    "type": "textbox",
                    "query": "",
                    "current": {"text": "", "value": ""},
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def grafana_json(database: str = "kefu") -> str:
    return json.dumps(grafana_dashboard(database), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["grafana"]:
        sys.stdout.write(grafana_json())
    else:
        sys.exit("usage: python -m projections.clickhouse_views grafana")
