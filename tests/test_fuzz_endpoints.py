"""Bad input at every HTTP endpoint of the gateway, taken from its OpenAPI document:
malformed JSON, missing and wrong API keys, another tenant's key, unknown
conversations, oversized bodies, and schemathesis-generated requests. Each gets a
4xx (never a 5xx), nothing is published for the fuzz tenants, and the gateway still
serves afterwards. The document itself is kept in docs/openapi.json (this test fails
when it drifts; ``.venv/bin/python -m tests.test_fuzz_endpoints`` rewrites it).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from aiokafka import AIOKafkaConsumer, TopicPartition
from hypothesis import HealthCheck, Phase
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode

from connectors.files_api import UPLOAD_PATHS
from connectors.gateway import GatewayConfig, create_app
from kefu.settings import Settings
from schemas.codec import CODEC
from schemas.topics import TopicNames
from streams.faust_private import topic_partitions

DOC = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
FUZZ_TENANTS = frozenset({"fuzz", "fuzz2"})
METHODS = ("get", "put", "post", "patch", "delete")
MAX_EXAMPLES = 25  # per operation and mode: bounded in time on a 2-core machine


def current_openapi() -> dict[str, Any]:
    app = create_app(GatewayConfig(bootstrap="", commands_topic="", redis_url="", api_keys={}))
    return app.openapi()


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_openapi_document_is_published_and_current() -> None:
    assert DOC.exists(), "run .venv/bin/python -m tests.test_fuzz_endpoints"
    assert DOC.read_text() == render(current_openapi()), (
        "docs/openapi.json drifted: run .venv/bin/python -m tests.test_fuzz_endpoints"
    )


# ----------------------------------------------------------------------- the watch


class TopicWatch:
    """End offsets of the commands and routing topics, and what was published to
    them between two marks (decoded), on a loop of its own."""

    def __init__(self, settings: Settings) -> None:
        names = TopicNames(settings.topic_prefix)
        self._loop = asyncio.new_event_loop()
        topics = (names.commands, names.routing)
        self._consumer, self._parts = self._loop.run_until_complete(
            self._start(settings.kafka.servers, topics)
        )

    @staticmethod
    async def _start(
        servers: str, topics: tuple[str, ...]
    ) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
        # aiokafka binds to the running loop: construct and assign inside it.
        consumer = AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False)
        await consumer.start()
        # A group-less consumer's metadata knows no topic until it is assigned one: the
        # partitions come from a fetch of the cluster's (with partitions_for_topic alone
        # the watch watched nothing, and "nothing published" held vacuously).
        parts = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(await topic_partitions(consumer, topic))
        ]
        assert parts, f"no partitions for {topics}"
        consumer.assign(parts)
        return consumer, parts

    def mark(self) -> dict[TopicPartition, int]:
        ends: dict[TopicPartition, int] = self._loop.run_until_complete(
            self._consumer.end_offsets(self._parts)
        )
        return ends

    def published_since(self, start: dict[TopicPartition, int]) -> list[Any]:
        return self._loop.run_until_complete(self._read(start, self.mark()))

    async def _read(self, start: dict[TopicPartition, int], end: dict[TopicPartition, int]) -> Any:
        records: list[Any] = []
        pending = [tp for tp in self._parts if end[tp] > start[tp]]
        for tp in pending:
            self._consumer.seek(tp, start[tp])
        while pending:
            batch = await self._consumer.getmany(*pending, timeout_ms=1000)
            for tp, items in batch.items():
                for r in items:
                    if r.offset < end[tp]:  # a commit (batched receipts) holds several
                        records.extend(CODEC.decode_all(r.value))
            pending = [tp for tp in pending if await self._consumer.position(tp) < end[tp]]
        return records

    def fuzz_records_since(self, start: dict[TopicPartition, int]) -> list[Any]:
        """Records of the fuzz tenants: other tests' workers may publish meanwhile."""
        return [
            r for r in self.published_since(start) if getattr(r, "tenant_id", "") in FUZZ_TENANTS
        ]

    def close(self) -> None:
        self._loop.run_until_complete(self._consumer.stop())
        self._loop.close()


@pytest.fixture(scope="module")
def watch(pipeline: Settings) -> Iterator[TopicWatch]:
    w = TopicWatch(pipeline)
    try:
        yield w
    finally:
        w.close()


def base_url(settings: Settings) -> str:
    return f"http://{settings.gateway.host}:{settings.gateway.port}"


def key(settings: Settings, tenant: str) -> dict[str, str]:
    return {"X-Api-Key": settings.tenants[tenant].api_key.get_secret_value()}


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, spec)
        for path, item in sorted(document["paths"].items())
        for method, spec in sorted(item.items())
        if method in METHODS
    ]


def concrete(path: str, value: str) -> str:
    return re.sub(r"\{[^}]+\}", value, path)


def takes_api_key(spec: dict[str, Any]) -> bool:
    names = {p.get("name", "").lower() for p in spec.get("parameters", [])}
    return "x-api-key" in names or "authorization" in names


def assert_serving(settings: Settings) -> None:
    response = httpx.get(f"{base_url(settings)}/healthz", timeout=10)
    assert response.status_code == 200, response.text


# ------------------------------------------------------------- hand-made bad input


def test_every_operation_refuses_bad_input(pipeline: Settings, watch: TopicWatch) -> None:
    document = httpx.get(f"{base_url(pipeline)}/openapi.json", timeout=10).json()
    ops = operations(document)
    assert len(ops) >= 5, ops
    limit = pipeline.gateway.max_body_bytes
    upload_limit = max(pipeline.attachments.max_bytes.values()) + 64 * 1024
    unknown = f"no-such-{uuid.uuid4().hex[:8]}"
    start = watch.mark()
    seen: list[str] = []
    with httpx.Client(base_url=base_url(pipeline), timeout=30) as http:

        def check(method: str, url: str, expected: set[int] | None = None, **kw: Any) -> None:
            response = http.request(method, url, **kw)
            what = f"{method} {url} {sorted(kw)} -> {response.status_code} {response.text[:200]}"
            seen.append(what)
            assert response.status_code < 500, what
            if expected is not None:
                assert response.status_code in expected, what
            elif not (method == "GET" and response.status_code == 200):
                assert 400 <= response.status_code < 500, what

        for method, path, spec in ops:
            url = concrete(path, unknown)
            has_body = "requestBody" in spec
            body: dict[str, Any] = {"json": {}} if has_body else {}
            if takes_api_key(spec):
                # A multipart form that names who is calling (the console's upload:
                # tenant and agent are form fields) cannot check the key before it reads
                # the form: a JSON body is refused as the wrong form (422) first.
                names_caller = (
                    "multipart/form-data" in spec.get("requestBody", {}).get("content", {})
                    and "/console/" in path
                )
                refused = {401, 403, 422} if names_caller else {401, 403}
                check(method, url, {401, 403, 422}, **body)  # no key
                check(method, url, refused, headers={"X-Api-Key": "wrong"}, **body)
                check(method, url, refused, headers={"Authorization": "Bearer x"}, **body)
            if has_body:
                headers = {"Content-Type": "application/json"}
                if takes_api_key(spec):
                    headers |= key(pipeline, "fuzz")
                for garbage in (b"{not", b"[]", b"null", b'{"a": 1}', "ü".encode("latin-1")):
                    check(method, url, None, content=garbage, headers=headers)
                # Uploads have a limit of their own: the largest channel's, plus framing.
                over = upload_limit if path in UPLOAD_PATHS else limit
                check(method, url, {413}, content=b"x" * (over + 1), headers=headers)
            elif method == "GET" and takes_api_key(spec) and "{" in path:
                # Unknown conversation (or other resource) of a real tenant.
                check(method, url, {404, 422}, headers=key(pipeline, "fuzz"))

        # Another tenant's conversation: fuzz2's key cannot see fuzz's conversation.
        accepted = http.post(
            "/v1/messages",
            json={"customer_id": "owner", "text": "hello", "message_id": uuid.uuid4().hex},
            headers=key(pipeline, "fuzz"),
        )
        assert accepted.status_code == 202, accepted.text
        conversation = accepted.json()["conversation_id"]
        mark = watch.mark()  # the accepted message (and its effects) are not bad input
        got = http.get(f"/v1/conversations/{conversation}", headers=key(pipeline, "fuzz2"))
        assert got.status_code == 404, got.text
        # An oversized body without Content-Length (chunked) is refused too.
        chunks = iter([b"{" + b" " * limit, b"}"])
        chunked = http.post(
            "/v1/messages", content=chunks, headers={**key(pipeline, "fuzz"), "X-Pad": "1"}
        )
        assert chunked.status_code == 413, chunked.text

    bad = [r for r in watch.fuzz_records_since(start) if r.conversation_id != conversation]
    bad += [r for r in watch.fuzz_records_since(mark) if r.conversation_id != conversation]
    assert bad == [], [type(r).__name__ for r in bad]
    assert len(seen) > 3 * len(ops) // 2
    assert_serving(pipeline)


VALID_ACTIONS = {
    "handoff": {"to": "human", "requested_by": "fuzz"},
    "close": {"closed_by": "fuzz"},
    "replies": {"agent_id": "fuzz-agent", "text": "hello"},
    "rating": {"rating": 5},
}


def test_actions_on_unknown_conversations_get_404(pipeline: Settings) -> None:
    unknown = f"no-such-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=base_url(pipeline), timeout=30) as http:
        for action, body in VALID_ACTIONS.items():
            url = f"/v1/conversations/{unknown}/{action}"
            response = http.post(url, json=body, headers=key(pipeline, "fuzz"))
            assert response.status_code == 404, f"{url} -> {response.status_code}"


# ------------------------------------------------------------------- schemathesis


def fuzz_operations(
    settings: Settings, mode: GenerationMode, headers: dict[str, str]
) -> tuple[list[str], int]:
    """Run generated cases against every operation; returns 5xx failures and a count."""
    schema = schemathesis.openapi.from_url(f"{base_url(settings)}/openapi.json")
    failures: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        if operation.method.upper() == "GET" and not operation.definition.raw.get("parameters"):
            continue  # pages and health: no input to fuzz
        strategy = operation.as_strategy(generation_mode=mode)

        @hypothesis.settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis.given(case=strategy)
        def run(case: Any) -> None:
            nonlocal calls
            calls += 1
            response = case.call(base_url=base_url(settings), headers=headers, timeout=30)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:200]}"
                )

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            # Nothing about this operation's input can be made invalid (e.g. a free
            # string query parameter): the positive runs cover it.
            continue
    print(f"schemathesis {mode.value}: {calls} requests")
    return failures, calls


def test_generated_requests_with_wrong_keys_are_refused(
    pipeline: Settings, watch: TopicWatch
) -> None:
    start = watch.mark()
    failures, calls = fuzz_operations(
        pipeline, GenerationMode.POSITIVE, {"X-Api-Key": "wrong", "Authorization": "Bearer x"}
    )
    assert failures == []
    assert calls > 0
    assert watch.fuzz_records_since(start) == []
    assert_serving(pipeline)


def test_generated_invalid_requests_of_a_real_tenant_get_4xx(
    pipeline: Settings, watch: TopicWatch
) -> None:
    start = watch.mark()
    failures, calls = fuzz_operations(pipeline, GenerationMode.NEGATIVE, key(pipeline, "fuzz"))
    assert failures == []
    assert calls > 0
    # Negative cases break the schema, so nothing of theirs may reach the log.
    assert watch.fuzz_records_since(start) == []
    assert_serving(pipeline)


def test_generated_valid_requests_never_get_5xx(pipeline: Settings) -> None:
    failures, calls = fuzz_operations(pipeline, GenerationMode.POSITIVE, key(pipeline, "fuzz"))
    assert failures == []
    assert calls > 0
    assert_serving(pipeline)


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render(current_openapi()))
    print(f"wrote {DOC}")
