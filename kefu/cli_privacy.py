"""``kefu privacy``: a customer's data on request (``kefu/privacy.py``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from kefu.privacy import export_customer
from kefu.settings import load_settings
from schemas.topics import TopicNames


@click.group()
def privacy() -> None:
    """Customers' data: export (access requests)."""


@privacy.command("export")
@click.option("--tenant", required=True)
@click.option("--customer", required=True, help="the customer id the channel gives")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def export(tenant: str, customer: str, out: Path | None) -> None:
    """Every conversation of the customer, each event in words, as JSON."""
    settings = load_settings()
    data = asyncio.run(
        export_customer(
            settings.kafka.servers,
            TopicNames(settings.topic_prefix).events,
            settings.redis.dsn,
            tenant,
            customer,
            settings.kafka.client_options(),
        )
    )
    text = json.dumps(data, ensure_ascii=False, indent=2)
    if out is None:
        click.echo(text)
    else:
        out.write_text(text + "\n", "utf-8")
        click.echo(f"{len(data['conversations'])} conversation(s) -> {out}", err=True)
