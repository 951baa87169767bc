"""``kefu files``: a tenant's attachment storage: how much, and deleting what is no longer
to be kept (an erased customer's conversation, conversations closed long ago).

Blobs are keyed by tenant and conversation (``connectors/blobs.py``), so deleting a
conversation's files is deleting one prefix: nothing another conversation shows goes
with it. The events keep the attachments' metadata (the log is never rewritten); a link
to a deleted file answers 410.
"""

from __future__ import annotations

import asyncio
import time

import click
import redis.asyncio as aioredis

from connectors.attachments import Quota
from connectors.blobs import BlobStore, conversation_prefix
from kefu.files import blob_store
from kefu.settings import Settings, load_settings
from schemas.keys import blob_usage_key, conversation_key, status_key


@click.group()
def files() -> None:
    """Attachment storage: usage, purge."""


@files.command("usage")
@click.option("--tenant", required=True)
def usage(tenant: str) -> None:
    """Bytes a tenant has in the blob store."""
    store = blob_store(load_settings())
    click.echo(f"{tenant}: {asyncio.run(store.usage(f'{tenant}/'))} bytes")


async def purge_conversations(
    settings: Settings, store: BlobStore, tenant: str, conversations: list[str]
) -> int:
    """Delete the files of ``conversations``; the bytes freed (also off the quota count)."""
    freed = 0
    for conversation in conversations:
        freed += await store.delete_prefix(conversation_prefix(tenant, conversation))
    if freed:
        client = aioredis.Redis.from_url(settings.redis.dsn)
        try:
            if await client.exists(blob_usage_key(tenant)):
                await Quota(client, store, 0).free(tenant, freed)
        finally:
            await client.aclose()
    return freed


async def closed_before(settings: Settings, tenant: str, cutoff_ms: int) -> list[str]:
    """The tenant's conversations closed before ``cutoff_ms`` (from the Redis read model)."""
    client = aioredis.Redis.from_url(settings.redis.dsn, decode_responses=True)
    try:
        closed = await client.zrange(status_key(tenant, "closed"), 0, -1)
        out: list[str] = []
        for conversation in map(str, closed):
            at = await client.hget(conversation_key(tenant, conversation), "closed_at")
            if at and int(at) < cutoff_ms:
                out.append(conversation)
        return out
    finally:
        await client.aclose()


@files.command("purge")
@click.option("--tenant", required=True)
@click.option("--conversation", "conversations", multiple=True, help="a conversation id")
@click.option(
    "--closed-days", type=int, default=None, help="every conversation closed this many days ago"
)
def purge(tenant: str, conversations: tuple[str, ...], closed_days: int | None) -> None:
    """Delete the files of the given conversations, or of those closed long ago."""
    settings = load_settings()
    store = blob_store(settings)
    chosen = list(conversations)
    if closed_days is not None:
        cutoff = int(time.time() * 1000) - closed_days * 86_400_000
        chosen += asyncio.run(closed_before(settings, tenant, cutoff))
    if not chosen:
        raise click.UsageError("name --conversation or --closed-days")
    freed = asyncio.run(purge_conversations(settings, store, tenant, chosen))
    click.echo(f"{tenant}: {len(chosen)} conversation(s), {freed} bytes deleted")
