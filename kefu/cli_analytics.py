"""``kefu analytics report``, ``kefu replay`` and ``kefu audit``: the read models'
commands (registered in kefu/cli.py)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click

from kefu.settings import Settings, load_settings


def _settings() -> Settings:
    return load_settings()


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in columns], *[[str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report_runner(settings: Settings) -> Any:
    """Named reports over ``AnalyticsClient.query``: the CLI's, and the gateway's
    dashboard data (injected into the gateway: connectors never import projections)."""
    from projections.clickhouse_query import AnalyticsClient
    from projections.clickhouse_views import ReportRunner

    client = AnalyticsClient(settings.clickhouse_url, settings.clickhouse.query_port)
    return ReportRunner(client.query, settings.clickhouse.database)


# ------------------------------------------------------------------------- reports


@click.command("report")
@click.argument("name", required=False)
@click.option("--since", default="7d", show_default=True, help="7d, 12h, 30m, epoch ms, ISO")
@click.option("--until", default="", help="end of the window (default: now)")
@click.option("--tenant", default="", help="one tenant (default: all)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--sql", "show_sql", is_flag=True, help="print the SQL instead of running it")
def report(
    name: str | None, since: str, until: str, tenant: str, as_json: bool, show_sql: bool
) -> None:
    """Run a named report (no NAME: list them)."""
    from projections.clickhouse_query import QueryError
    from projections.clickhouse_views import REPORTS, parse_since, parse_time, render

    if not name:
        for report_ in REPORTS.values():
            click.echo(f"{report_.name:<16} {report_.title}")
        return
    if name not in REPORTS:
        raise click.BadParameter(f"no report {name!r}; one of: {', '.join(REPORTS)}")
    try:
        since_ms = parse_since(since)
        until_ms = parse_time(until) if until else parse_since("0s")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    settings = _settings()
    if show_sql:
        click.echo(render(name, settings.clickhouse.database, tenant, since_ms, until_ms))
        return
    try:
        columns, rows = report_runner(settings).run(name, tenant, since_ms, until_ms)
    except QueryError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({"columns": columns, "rows": rows}, default=str))
    elif not rows:
        click.echo(f"{name}: no rows in the window")
    else:
        click.echo(_table(columns, rows))


# -------------------------------------------------------------------------- replay


@click.command("replay")
@click.option(
    "--projection",
    type=click.Choice(["redis", "clickhouse", "all"]),
    default="all",
    show_default=True,
)
@click.option("--from", "since", default="", help="events at or after (ISO, epoch ms, 7d)")
@click.option("--to", "until", default="", help="events before (ISO, epoch ms)")
@click.option("--tenant", default="", help="one tenant's events")
@click.option("--conversation", default="", help="one conversation's events")
@click.option("--reset", is_flag=True, help="drop what the filter covers first: a rebuild")
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=None,
    help="replay processes, each a share of the partitions  [default: one per core]",
)
def replay_command(
    projection: str,
    since: str,
    until: str,
    tenant: str,
    conversation: str,
    reset: bool,
    processes: int | None,
) -> None:
    """Rebuild read models from the log (kefu.events), with the projections' own code."""
    from projections.clickhouse_views import parse_since, parse_time
    from projections.replay import ReplayFilter

    try:
        flt = ReplayFilter(
            tenant=tenant,
            conversation=conversation,
            since_ms=parse_since(since) if since else None,
            until_ms=parse_time(until) if until else None,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    from projections.replay_split import default_processes

    workers = processes or default_processes()
    stats = asyncio.run(_replay(_settings(), projection, flt, reset, workers))
    click.echo(
        f"replayed {stats.applied} events into {projection} "
        f"(read {stats.read} from the log in {stats.seconds:.1f} s, "
        f"{stats.rate:,.0f} events/s; {stats.undecodable} undecodable skipped)"
    )


def replay_job(settings: Settings, projection: str) -> Any:
    """The ``ReplayJob`` of ``projection`` (redis, clickhouse or all) for ``settings``."""
    import functools

    from kefu.data_keys import install_for
    from projections.replay import replay_topics
    from projections.replay_split import ClickHouseTargetSpec, ReplayJob
    from schemas.topics import TopicNames

    ch = settings.clickhouse
    return ReplayJob(
        settings.kafka.servers,
        tuple(replay_topics(TopicNames(settings.topic_prefix))),
        kafka_options=settings.kafka.client_options,
        redis_dsn=settings.redis.dsn if projection in ("redis", "all") else None,
        clickhouse=(
            ClickHouseTargetSpec(settings.clickhouse_url, ch.database, ch.query_port)
            if projection in ("clickhouse", "all")
            else None
        ),
        unsealer=functools.partial(install_for, settings),
    )


async def _replay(
    settings: Settings, projection: str, flt: Any, reset: bool, processes: int
) -> Any:
    from projections.replay_split import split_replay

    job = replay_job(settings, projection)
    bar: Any = None

    def total(n: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=max(n, 1), label="replaying")
            bar.__enter__()
        bar.length = max(n, 1)  # split replays announce their ranges one by one

    def progress(n: int) -> None:
        if bar is not None:
            bar.update(n)

    try:
        return await split_replay(job, flt, processes, reset, progress=progress, on_total=total)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


# --------------------------------------------------------------------------- audit


@click.group("audit")
def audit() -> None:
    """A conversation's exact history, hash-chained (see projections/audit.py)."""


async def _from_log(settings: Settings, conversation: str) -> list[Any]:
    from projections.audit import read_log
    from schemas.topics import TopicNames

    # The audit's own reader: events are found by their conversation id inside each
    # record (a commit may carry another conversation's receipts under its key).
    return await read_log(
        settings.kafka.servers,
        TopicNames(settings.topic_prefix).events,
        conversation,
        settings.kafka.client_options(),
    )


def _from_archive(settings: Settings, conversation: str) -> list[Any]:
    from projections.audit import archive_entries, archive_sql
    from projections.clickhouse_query import AnalyticsClient

    client = AnalyticsClient(settings.clickhouse_url, settings.clickhouse.query_port)
    sql = archive_sql(settings.clickhouse.database, conversation)
    return archive_entries(client.query(sql).rows)


def _history(settings: Settings, conversation: str, source: str) -> list[Any]:
    from projections.audit import ordered

    if source == "log":
        entries = asyncio.run(_from_log(settings, conversation))
    else:
        entries = _from_archive(settings, conversation)
    history, problems = ordered(entries)
    for problem in problems:
        click.echo(f"warning: {problem}", err=True)
    return history


_SOURCE = click.option(
    "--source",
    type=click.Choice(["log", "archive"]),
    default="log",
    show_default=True,
    help="the Kafka log, or the ClickHouse archive (after Kafka's retention)",
)


@audit.command("show")
@click.option("--conversation", required=True)
@_SOURCE
@click.option("--json", "as_json", is_flag=True)
def audit_show(conversation: str, source: str, as_json: bool) -> None:
    """Print the verified history: who said what, when, which model or agent, moderation."""
    from projections.audit import export_lines, verify_entries

    history = _history(_settings(), conversation, source)
    verdict = verify_entries(history)
    lines = export_lines(conversation, history)
    if as_json:
        click.echo(json.dumps({"verdict": verdict.to_json(), "history": lines[:-1]}))
    else:
        for line in lines[:-1]:
            ev = line["event"]
            who = ev.get("who") or ev.get("verdict") or ""
            text = ev.get("text", "")
            extra = {k: v for k, v in ev.items() if k not in ("type", "at", "who", "text")}
            click.echo(f"#{line['seq']:<4} {ev['at']}  {ev['type']:<20} {who:<24} {text}")
            if extra:
                click.echo(f"      {json.dumps(extra, ensure_ascii=False)}")
        state = "verified" if verdict.ok else f"BROKEN at seq {verdict.broken_at}: {verdict.reason}"
        click.echo(f"{verdict.events} events, chain head {lines[-1]['head']} ({state})")
    if not verdict.ok:
        sys.exit(1)


@audit.command("export")
@click.option("--conversation", required=True)
@_SOURCE
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def audit_export(conversation: str, source: str, out: Path | None) -> None:
    """Write the history as JSON lines (bytes, sha256, chain link, words), then the head."""
    from projections.audit import export_lines

    history = _history(_settings(), conversation, source)
    if not history:
        raise click.ClickException(f"no events of conversation {conversation!r} in the {source}")
    text = "".join(
        json.dumps(line, ensure_ascii=False) + "\n" for line in export_lines(conversation, history)
    )
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, "utf-8")
        click.echo(f"{len(history)} events -> {out}", err=True)


@audit.command("verify")
@click.option("--conversation", required=True)
@click.option(
    "--export",
    "export_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="an export to check against the log (default: compare the log and the archive)",
)
@_SOURCE
@click.option("--json", "as_json", is_flag=True)
def audit_verify(conversation: str, export_file: Path | None, source: str, as_json: bool) -> None:
    """Recompute the chain from the source and compare: exit 1 at the first broken link."""
    from projections.audit import compare, verify_entries, verify_export

    settings = _settings()
    history = _history(settings, conversation, source)
    if export_file is not None:
        try:
            lines = [json.loads(x) for x in export_file.read_text("utf-8").splitlines() if x]
        except ValueError as exc:
            raise click.ClickException(f"{export_file}: not JSON lines: {exc}") from exc
        verdict = verify_export(lines, history)
        what = f"export {export_file} against the {source}"
    else:
        verdict = verify_entries(history)
        if verdict.ok:
            verdict = compare(history, _history(settings, conversation, "archive"))
        what = "the log against the archive"
    signed = _against_checkpoints(settings, conversation, history) if verdict.ok else None
    if signed is not None and not signed.ok:
        verdict, what = signed, "the log against its signed checkpoints"
    if as_json:
        click.echo(json.dumps(verdict.to_json()))
    elif verdict.ok:
        click.echo(f"ok: {what}: {verdict.events} events, chain head {verdict.head}")
        if signed is not None:
            click.echo(f"ok: the keyed chain reaches every signed checkpoint ({signed.head})")
    else:
        click.echo(f"BROKEN: {what}: seq {verdict.broken_at}: {verdict.reason}")
    if not verdict.ok:
        sys.exit(1)


def audit_master_key(settings: Settings) -> bytes:
    from kefu.files import machine_secret

    configured = settings.security.audit_key.get_secret_value()
    return configured.encode() if configured else machine_secret(settings, "audit")


def _against_checkpoints(settings: Settings, conversation: str, history: list[Any]) -> Any:
    """The keyed chain against the conversation's signed checkpoints (None: none yet)."""
    from projections.audit_keyed import read_checkpoints, tenant_key, verify_keyed
    from schemas.codec import CODEC
    from schemas.topics import TopicNames

    found = asyncio.run(
        read_checkpoints(
            settings.kafka.servers,
            TopicNames(settings.topic_prefix).audit_checkpoints,
            conversation,
            settings.kafka.client_options(),
        )
    )
    if not found:
        return None
    tenant = found[0].tenant_id if not history else CODEC.decode(history[0].raw).tenant_id  # type: ignore[attr-defined]
    return verify_keyed(history, found, tenant_key(audit_master_key(settings), tenant))


@audit.command("checkpoint")
@click.option("--tenant", default=None, help="only this tenant's conversations")
def audit_checkpoint(tenant: str | None) -> None:
    """Sign the head of every conversation whose history grew (run it on a schedule:
    a rewritten, removed or cut history below a checkpoint then fails verify)."""
    from projections.audit_keyed import checkpoint_log
    from schemas.topics import TopicNames

    settings = _settings()
    names = TopicNames(settings.topic_prefix)
    written = asyncio.run(
        checkpoint_log(
            settings.kafka.servers,
            names.events,
            names.audit_checkpoints,
            audit_master_key(settings),
            settings.kafka.client_options(),
            tenant,
        )
    )
    click.echo(f"{written} checkpoint(s) signed")
