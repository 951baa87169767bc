"""``kefu deadletter``: list the dead-letter topic, send dead commands back
(``kefu.deadletters``)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import click
from aiokafka.errors import KafkaConnectionError

from kefu.deadletters import Letter, read_letters, redrive
from kefu.settings import Settings, load_settings
from schemas.time import iso_ms

T = TypeVar("T")


def _settings() -> Settings:
    return load_settings()


def _run(settings: Settings, work: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(work)
    except KafkaConnectionError as exc:
        raise click.ClickException(
            f"no Kafka broker at {settings.kafka.servers} ({exc}); start it with kefu stack up"
        ) from exc


def _row(item: Letter) -> dict[str, object]:
    letter = item.letter
    return {
        "offset": item.offset,
        "failed_at": iso_ms(letter.failed_at),
        "consumer": letter.consumer,
        "source": f"{letter.source_topic}[{letter.partition}]@{letter.offset}",
        "type": item.record_type,
        "key": (letter.key or b"").decode(errors="replace"),
        "reason": letter.reason,
        "events": item.events(),  # a dead Commit's events; [] for one record
    }


@click.group()
def deadletter() -> None:
    """What consumers could not take, and sending dead commands back."""


@deadletter.command("list")
@click.option("--consumer", default="", help="only this consumer's (conversation, router, ...)")
@click.option("--reason", "reason_part", default="", help="only reasons containing this text")
@click.option("--limit", default=50, show_default=True, help="the newest N (0: all)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def list_letters(consumer: str, reason_part: str, limit: int, as_json: bool) -> None:
    """The dead letters, oldest first, with why and where each came from."""
    from kefu.cli import format_table

    settings = _settings()
    letters = [
        item
        for item in _run(settings, read_letters(settings))
        if (not consumer or item.letter.consumer == consumer) and reason_part in item.letter.reason
    ]
    shown = letters[-limit:] if limit else letters
    rows = [_row(item) for item in shown]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False))
        return
    columns = ["offset", "failed_at", "consumer", "source", "type", "key", "reason"]
    # The type column names a commit's events too ("Commit: MessageReceived #1, ...").
    table = [[str(row[c])[:80] for c in columns] for row in rows]
    for line, item in zip(table, shown, strict=True):
        line[columns.index("type")] = item.summary()[:80]
    click.echo(format_table(columns, table))
    click.echo(f"{len(shown)} of {len(letters)} dead letters")


@deadletter.command("redrive")
@click.argument("offsets", nargs=-1, type=int, required=True)
@click.option("--dry-run", is_flag=True, help="say what would be sent, send nothing")
def redrive_letters(offsets: tuple[int, ...], dry_run: bool) -> None:
    """Send the dead commands at OFFSETS (of the dead-letter topic) back to their topic.

    Only commands: a log's records (events, queue events, word lists) are still on
    their topic (rebuild with ``kefu replay``). Exits 1 if any was refused."""
    settings = _settings()
    done = _run(settings, redrive(settings, list(offsets), dry_run=dry_run))
    for item in done:
        if item.sent_to:
            click.echo(f"{item.offset}: sent to {item.sent_to}")
        else:
            click.echo(f"{item.offset}: not sent: {item.refused}")
    if not dry_run and any(item.refused for item in done):
        sys.exit(1)
