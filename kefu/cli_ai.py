"""``kefu ai``: check a tenant's intent set and try the AI responder from a shell."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click
import redis.asyncio as aioredis

from kefu.settings import load_settings
from schemas.records import ReplyRequested
from streams.intents import evaluate, load_intents


@click.group()
def ai() -> None:
    """AI replies: intents, models, the semantic cache."""


@ai.command("intents-eval")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--threshold", type=float, default=None, help="default: ai.intent_threshold")
@click.option("--misses", is_flag=True, help="list the held-out questions it got wrong")
def intents_eval(path: str | None, threshold: float | None, misses: bool) -> None:
    """Accuracy on the held-out split (every 4th example) of an intents file."""
    settings = load_settings()
    specs = load_intents(Path(path) if path else None)
    report = evaluate(specs, threshold if threshold is not None else settings.ai.intent_threshold)
    click.echo(
        f"{len(specs)} intents, {report.train} training and {report.test} held-out examples\n"
        f"accuracy {report.accuracy:.3f} "
        + " ".join(f"({lang} {acc:.3f})" for lang, acc in report.by_language.items())
        + f"\nat >= {report.threshold}: {report.coverage:.0%} of questions, "
        f"accuracy {report.accuracy_above:.3f}"
    )
    if misses:
        for text, expected, got in report.misses:
            click.echo(f"  {expected:<18} -> {got:<18} {text}")


@ai.command("ask")
@click.argument("text")
@click.option("--tenant", default="demo")
@click.option("--language", default=None)
def ask(text: str, tenant: str, language: str | None) -> None:
    """Answer TEXT as the worker would (configured models, cache and rate limit)."""
    from kefu.ai import build_responder

    settings = load_settings()

    async def run() -> dict[str, object]:
        redis = aioredis.Redis.from_url(settings.redis.dsn)
        try:
            responder = build_responder(settings, redis)
            answer = await responder.answer(
                ReplyRequested(
                    event_id="cli",
                    conversation_id="cli",
                    tenant_id=tenant,
                    seq=1,
                    occurred_at=0,
                    message_event_id="cli",
                    channel="cli",
                    text=text,
                    language=language,
                )
            )
        finally:
            await redis.aclose()
        return {name: getattr(answer, name) for name in answer.__dataclass_fields__}

    click.echo(json.dumps(asyncio.run(run()), ensure_ascii=False, indent=2))
