"""Read-only analytics queries, the same call whichever ClickHouse is configured.

With a server (``http://…``) a reader connects directly with clickhouse-connect. With
the embedded engine (``chdb://…``) only the projector process may open the data
directory, so readers ask it over a loopback endpoint that it serves (``query_app``).
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import clickhouse_connect
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from projections.clickhouse_events import ClickHouseStore, delete_sql

MAX_SQL = 100_000


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def query_app(store: ClickHouseStore) -> Starlette:
    async def query(request: Request) -> JSONResponse:
        sql = (await request.body()).decode("utf-8", "replace").strip()
        if not sql or len(sql) > MAX_SQL:
            return JSONResponse({"error": f"send 1-{MAX_SQL} bytes of SQL"}, status_code=400)
        # Query parameters as ClickHouse's own HTTP interface takes them: param_<name>.
        parameters = {
            k.removeprefix("param_"): v
            for k, v in request.query_params.items()
            if k.startswith("param_")
        }
        try:
            columns, rows = await store.query(sql, readonly=True, parameters=parameters or None)
        except Exception as exc:  # ClickHouse's own message is the useful answer
            return JSONResponse({"error": str(exc).strip()[:2000]}, status_code=400)
        return JSONResponse({"columns": columns, "rows": _jsonable(rows)})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "database": store.database})

    async def insert(request: Request) -> JSONResponse:
        """Replay's writes (rows made by ``row_of`` from the log, sent as
        ``compact_rows``) into the owner's chdb, parsed by ClickHouse itself."""
        try:
            await store.insert_compact(await request.body())
        except Exception as exc:  # ClickHouse's own message says what is wrong
            return JSONResponse({"error": str(exc).strip()[:2000]}, status_code=400)
        return JSONResponse({"inserted": True})

    async def delete(request: Request) -> JSONResponse:
        """Replay's ``--reset``: drop the rows it is about to rewrite from the log."""
        try:
            body = await request.json()
            await store.command(
                delete_sql(
                    store.database,
                    str(body.get("tenant") or ""),
                    str(body.get("conversation") or ""),
                    body.get("since_ms"),
                    body.get("until_ms"),
                )
            )
        except Exception as exc:
            return JSONResponse({"error": str(exc).strip()[:2000]}, status_code=400)
        return JSONResponse({"deleted": True})

    return Starlette(
        routes=[
            Route("/query", query, methods=["POST"]),
            # Loopback only, like /query; they write only what the log already holds.
            Route("/events", insert, methods=["POST"]),
            Route("/events/delete", delete, methods=["POST"]),
            Route("/healthz", health),
        ]
    )


class QueryError(RuntimeError):
    pass


class AnalyticsClient:
    def __init__(self, url: str, query_port: int, timeout: float = 30.0) -> None:
        self._embedded = url.startswith("chdb://")
        self._endpoint = f"http://127.0.0.1:{query_port}/query"
        self._url = url
        self._timeout = timeout

    def query(self, sql: str, parameters: Mapping[str, str] | None = None) -> QueryResult:
        """``parameters`` fill ``{name:Type}`` placeholders, bound by ClickHouse itself
        (so a reader's input is never spliced into SQL text)."""
        if self._embedded:
            params = {f"param_{k}": v for k, v in (parameters or {}).items()}
            response = httpx.post(
                self._endpoint, content=sql.encode(), params=params, timeout=self._timeout
            )
            body = response.json()
            if response.status_code != 200:
                raise QueryError(body.get("error", response.text))
            return QueryResult(body["columns"], body["rows"])
        client = clickhouse_connect.get_client(dsn=self._url)
        try:
            result = client.query(sql, parameters=dict(parameters or {}), settings={"readonly": 1})
        except Exception as exc:
            raise QueryError(str(exc)) from exc
        finally:
            client.close()
        return QueryResult(list(result.column_names), _jsonable(result.result_rows))
