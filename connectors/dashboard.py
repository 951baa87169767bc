"""The analytics dashboard: ``/dashboard`` (a static page drawing SVG charts) and its
data, ``GET /v1/dashboard/reports[/{name}]``.

Data is tenant-scoped like the REST API: the page sends the tenant's API key, and a
report only ever covers that tenant. The reports come from a ``DashboardData`` the
application injects (kefu builds it over ``AnalyticsClient``): connectors never import
projections.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any, Protocol

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from connectors.rest_api import Tenant

router = APIRouter(tags=["analytics"])
MAX_WINDOW_MS = 366 * 86_400_000


class DashboardData(Protocol):
    def catalogue(self) -> list[dict[str, Any]]: ...

    def run(
        self, name: str, tenant: str, since_ms: int, until_ms: int
    ) -> tuple[list[str], list[list[Any]]]: ...


def _data(request: Request) -> DashboardData:
    data: DashboardData | None = getattr(request.app.state, "dashboard", None)
    if data is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "analytics not configured")
    return data


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    html = (resources.files("connectors") / "static" / "dashboard.html").read_text("utf-8")
    return HTMLResponse(html)


@router.get("/v1/dashboard/reports")
async def reports(tenant: Tenant, request: Request) -> dict[str, Any]:
    return {"tenant": tenant, "reports": _data(request).catalogue()}


@router.get("/v1/dashboard/reports/{name}")
async def report(
    name: str,
    tenant: Tenant,
    request: Request,
    since: int | None = Query(default=None, description="epoch ms (default: 24 h ago)"),
    until: int | None = Query(default=None, description="epoch ms, exclusive (default: now)"),
) -> dict[str, Any]:
    data = _data(request)
    if name not in {r["name"] for r in data.catalogue()}:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no report {name!r}")
    until_ms = until if until is not None else int(time.time() * 1000) + 1
    since_ms = since if since is not None else until_ms - 86_400_000
    if not 0 < until_ms - since_ms <= MAX_WINDOW_MS:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "since must be before until, ≤ 366 d")
    try:
        columns, rows = await run_in_threadpool(data.run, name, tenant, since_ms, until_ms)
    except Exception as exc:  # the store's own message says what is wrong
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"analytics: {exc}"[:500]) from exc
    return {"name": name, "columns": columns, "rows": rows, "since": since_ms, "until": until_ms}
