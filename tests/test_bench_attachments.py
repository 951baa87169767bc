"""bench/attachments.py in a reduced mode against the session's pipeline: its two
measurements run end to end (uploads, messages, the Redis list, ClickHouse's report)
and report what they saw. Timing is never asserted: only that every call succeeded and
every photo became visible."""

from __future__ import annotations

import asyncio

from bench.attachments import Summary, counted_in_clickhouse, ingest, merged, photo, visibility
from kefu.settings import Settings

# The AI answers demo's FAQ questions, so no conversation waits in a human queue that
# another test's agent would be given.
TENANT = "demo"


def test_bench_runs_reduced(pipeline: Settings) -> None:
    g = pipeline.gateway
    base = f"http://{g.host}:{g.port}"
    key = pipeline.tenants[TENANT].api_key.get_secret_value()
    image = photo(20_000, 320, 240)

    seen = asyncio.run(
        visibility(base, key, pipeline.redis.dsn, TENANT, image, uploads=5, rate=20, patience=30)
    )
    assert (len(seen.visible_s), seen.missing, dict(seen.failures)) == (5, 0, {})
    assert len(seen.accept_s) == 5
    columns, *rows = counted_in_clickhouse(pipeline, TENANT, 5)
    by_key = {(r[0], r[1], r[2]): dict(zip(columns, r, strict=True)) for r in rows}
    assert by_key["in", "api", "image"]["attachments"] >= 5

    phases = asyncio.run(
        ingest(
            base,
            key,
            image,
            rounds=1,
            seconds=0.5,
            concurrency=4,
            share=0.5,
            warmup=0,
            max_messages=40,
        )
    )
    text, mixed = merged(phases, "text"), merged(phases, "mixed")
    assert [p.kind for p in phases] == ["text", "mixed"]
    assert text.messages > 0 and not text.image_ms and not text.failures
    assert mixed.image_ms and mixed.text_ms and not mixed.failures
    lines = list(Summary(text, mixed, seen, len(image)).lines())
    assert lines[2].startswith("attachments: mixed / text only = ")
