"""``kefu privacy``: a customer's data on request (``kefu/privacy.py``), erasure and
retention (``kefu/erasure.py``)."""

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
    """Customers' data: export (access requests), erase, retention."""


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


@privacy.command("erase")
@click.option("--tenant", required=True)
@click.option("--customer", required=True, help="the customer id the channel gives")
@click.option("--by", "requested_by", default="", help="who asked (default: cli:$USER)")
@click.option("--reason", default="request", show_default=True)
def erase(tenant: str, customer: str, requested_by: str, reason: str) -> None:
    """Erase a customer: their data keys shredded, read models redacted, files deleted.
    The events stay on the log (the audit still verifies); their personal fields read
    as "[erased]" from now on, in every replay too."""
    import getpass

    from connectors.keystore import UnknownCustomer
    from kefu.data_keys import key_store
    from kefu.erasure import erase_customer, known_tenant, read_config

    settings = load_settings()

    async def run() -> dict[str, object]:
        if not known_tenant(settings, await read_config(settings), tenant):
            raise click.ClickException(f"no tenant {tenant!r}")
        store = key_store(settings)
        who = requested_by or f"cli:{getpass.getuser()}"
        try:
            done = await erase_customer(settings, store, tenant, customer, who, reason)
        except UnknownCustomer as exc:
            raise click.ClickException(str(exc)) from exc
        finally:
            store.stop()
        return done.to_json()

    click.echo(json.dumps(asyncio.run(run()), ensure_ascii=False, indent=2))


@privacy.command("retention")
@click.option("--tenant", "tenants", multiple=True, help="only these tenants (default: all)")
@click.option("--dry-run", is_flag=True, help="list who is due, erase nobody")
def retention(tenants: tuple[str, ...], dry_run: bool) -> None:
    """Erase every customer whose conversations all closed more than the tenant's
    retention_days ago (the workers run this every security.retention_interval_s)."""
    from kefu.data_keys import key_store
    from kefu.erasure import known_tenant, read_config, run_retention

    settings = load_settings()

    async def run() -> dict[str, list[str]]:
        config = await read_config(settings)
        for tenant in tenants:
            if not known_tenant(settings, config, tenant):
                raise click.ClickException(f"no tenant {tenant!r}")
        store = key_store(settings)
        try:
            return await run_retention(settings, store, config, tenants or None, dry_run=dry_run)
        finally:
            store.stop()

    done = asyncio.run(run())
    click.echo(json.dumps({"dry_run": dry_run, "erased": done}, ensure_ascii=False, indent=2))
