"""A webhook receiver for development, the demo and tests: verifies the signature of
each delivery, keeps one copy per idempotency key (so retries show as one), and lists
what arrived. It is what a tenant's endpoint is expected to do."""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from connectors.delivery import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, TENANT_HEADER, sign
from connectors.metrics import ops_routes


def webhook_sink(secrets: Mapping[str, bytes], journal: Path | None = None) -> Starlette:
    """With ``journal``, every accepted delivery is also appended there (a JSON line,
    written before the answer) and read back on start: a restart forgets nothing."""
    received: dict[str, dict[str, Any]] = {}
    duplicates = 0
    if journal is not None and journal.exists():
        for line in journal.read_text("utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut by a crash: its sender got no answer
                continue
            if entry["key"] in received:
                duplicates += 1
            else:
                received[entry["key"]] = entry["body"]

    async def webhook(request: Request) -> JSONResponse:
        nonlocal duplicates
        body = await request.body()
        tenant = request.headers.get(TENANT_HEADER, "")
        secret = secrets.get(tenant)
        signature = request.headers.get(SIGNATURE_HEADER, "")
        if secret is None or not hmac.compare_digest(signature, sign(secret, body)):
            return JSONResponse({"error": "bad signature"}, status_code=401)
        key = request.headers.get(IDEMPOTENCY_HEADER, "")
        if not key:
            return JSONResponse({"error": "missing idempotency key"}, status_code=400)
        entry = {"tenant": tenant, **json.loads(body)}
        if journal is not None:
            with journal.open("a", encoding="utf-8") as out:
                out.write(json.dumps({"key": key, "body": entry}) + "\n")
        if key in received:
            duplicates += 1
        else:
            received[key] = entry
        return JSONResponse({"ok": True})

    async def listing(request: Request) -> JSONResponse:
        return JSONResponse({"received": list(received.values()), "duplicates": duplicates})

    return Starlette(
        routes=[
            Route("/webhook", webhook, methods=["POST"]),
            Route("/received", listing, methods=["GET"]),
            *ops_routes(),  # /metrics, /healthz, /readyz
        ]
    )
