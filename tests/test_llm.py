"""The AI responder against a local OpenAI-compatible server: model choice, streaming,
accounting, the cache, the breaker and fallbacks, the rate limit, long input, retrieval."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form
from redis.exceptions import ConnectionError as RedisConnectionError

from schemas.codec import CODEC, MAGIC
from schemas.records import RecordReply, ReplyProduced, ReplyRequested
from streams.breaker import CLOSED, OPEN, LocalRateLimiter
from streams.llm import (
    AIConfig,
    AIResponder,
    KnowledgeLibrary,
    ModelSpec,
    Rule,
    Tuning,
    estimate_tokens,
    select_models,
    split_text,
)
from streams.semantic_cache import MemoryCacheStore, SemanticCache
from tests.fake_openai import FakeOpenAI, running
from tests.samples import CMD, EVT

LIBRARY = KnowledgeLibrary()
WATERPROOF = "is this jacket waterproof?"  # a confident product_question: a model answers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ListSink:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    async def send(self, tenant_id: str, conversation_id: str, frame: Mapping[str, Any]) -> None:
        self.frames.append(dict(frame, conversation=conversation_id))


def models(base_url: str, **kw: Any) -> tuple[ModelSpec, ...]:
    common: dict[str, Any] = {"first_token_timeout": 0.5, "timeout": 5.0, **kw}
    return (
        ModelSpec(
            "gpt-en", "gpt-en", base_url, languages=("en",), cost_in=0.5, cost_out=1.5, **common
        ),
        ModelSpec("qwen-zh", "qwen-zh", base_url, languages=("zh",), **common),
    )


def config(base_url: str, **kw: Any) -> AIConfig:
    model_kw = kw.pop("model_kw", {})
    defaults: dict[str, Any] = {"models": models(base_url, **model_kw), "breaker_reset": 5.0}
    return AIConfig(**{**defaults, **kw})


def request(text: str, tenant: str = "demo", channel: str = "web", n: int = 0) -> ReplyRequested:
    return ReplyRequested(
        event_id=f"req-{n}-{abs(hash(text)) % 10_000}",
        conversation_id=f"conv-{n}",
        tenant_id=tenant,
        seq=4,
        occurred_at=1,
        message_event_id="m",
        channel=channel,
        text=text,
    )


@pytest.fixture
def fake(fake_openai: FakeOpenAI) -> FakeOpenAI:
    fake_openai.reset()
    return fake_openai


# --- model choice ------------------------------------------------------------------------


async def test_model_is_chosen_by_language(fake: FakeOpenAI) -> None:
    responder = AIResponder(config(fake.base_url), LIBRARY)
    assert responder.answer_now(request(WATERPROOF)) is None  # a model's: not inline
    english = await responder.answer(request(WATERPROOF))
    chinese = await responder.answer(request("这件外套防水吗？"))
    assert [c.model for c in fake.chat_calls()] == ["gpt-en", "qwen-zh"]
    assert english.model == "gpt-en" and english.text.startswith("[gpt-en]")
    assert chinese.model == "qwen-zh" and english.responder == chinese.responder == "llm"


async def test_rules_come_before_language(fake: FakeOpenAI) -> None:
    rules = (Rule("qwen-zh", tenant="vip-tenant"), Rule("qwen-zh", pattern=r"\bwholesale\b"))
    responder = AIResponder(config(fake.base_url, rules=rules), LIBRARY)
    await responder.answer(request(WATERPROOF, tenant="vip-tenant"))
    await responder.answer(request("is this jacket waterproof? asking for wholesale"))
    await responder.answer(request(WATERPROOF))
    assert [c.model for c in fake.chat_calls()] == ["qwen-zh", "qwen-zh", "gpt-en"]


def test_model_order_falls_back_to_the_other_models() -> None:
    cfg = config("http://127.0.0.1:9/v1")
    assert [m.name for m in select_models(cfg, "t", "en", None, "hi")] == ["gpt-en", "qwen-zh"]
    assert [m.name for m in select_models(cfg, "t", "zh", None, "你好")] == ["qwen-zh", "gpt-en"]


async def test_temperature_and_max_tokens_per_tenant(fake: FakeOpenAI) -> None:
    cfg = config(fake.base_url, tenants={"cold": Tuning(temperature=0.0, max_tokens=64)})
    responder = AIResponder(cfg, LIBRARY)
    await responder.answer(request(WATERPROOF))
    await responder.answer(request(WATERPROOF, tenant="cold"))
    default, cold = fake.chat_calls()
    assert (default.temperature, default.max_tokens) == (0.4, 512)
    assert (cold.temperature, cold.max_tokens) == (0.0, 64)


async def test_model_and_min_confidence_set_in_admin_apply_to_the_next_answer(
    fake: FakeOpenAI,
) -> None:
    """/admin's ``ai`` entity (model, min_confidence), folded into the live config the
    worker reads, changes the next answer of the same responder: no restart."""
    from connectors.config_log import config_record
    from kefu.ai import LiveTuning
    from schemas.config import ConfigState

    live = ConfigState()
    responder = AIResponder(config(fake.base_url, tenants=LiveTuning({}, live, Tuning())), LIBRARY)

    def publish(data: dict[str, Any]) -> None:
        previous = live.version("demo", "ai", "-")
        assert live.apply(config_record("demo", "ai", "-", data, "admin", previous))

    first = await responder.answer(request(WATERPROOF))
    assert first.model == "gpt-en"  # English: the configured choice
    refund = await responder.answer(request("I want a refund", n=1))
    assert refund.responder == "intent-faq"  # 0.9999 >= the default 0.92
    # A configured label: that model first, whatever the language.
    publish({"model": "qwen-zh", "min_confidence": 0.92})
    second = await responder.answer(request(WATERPROOF, n=2))
    assert second.model == "qwen-zh" and second.text.startswith("[qwen-zh]")
    # Any other name: the model id the endpoint is asked for.
    publish({"model": "qwen-max-latest", "min_confidence": 0.92})
    third = await responder.answer(request(WATERPROOF, n=3))
    assert [c.model for c in fake.chat_calls()] == ["gpt-en", "qwen-zh", "qwen-max-latest"]
    assert third.model == "qwen-max-latest"
    # A stricter threshold: the same refund question is no longer confident enough for
    # the canned FAQ answer (given inline before): a model answers it.
    publish({"min_confidence": 1.0})
    strict = await responder.answer(request("I want a refund", n=4))
    assert strict.responder == "llm" and strict.confidence < 1.0
    assert responder.answer_now(request("I want a refund", n=4)) is None
    # Another tenant keeps the defaults.
    other = await responder.answer(request("I want a refund", tenant="t2", n=5))
    assert other.responder == "intent-faq"


# --- intent decisions make no model call ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "action", "responder"),
    [
        ("I want a refund", "answer", "intent-faq"),
        ("我要退款", "answer", "intent-faq"),
        ("转人工", "handoff", "intent"),
        ("talk to a human", "handoff", "intent"),
    ],
)
async def test_confident_intents_answer_without_a_model(
    fake: FakeOpenAI, text: str, action: str, responder: str
) -> None:
    responder_ = AIResponder(config(fake.base_url), LIBRARY)
    answer = await responder_.answer(request(text))
    assert (answer.action, answer.responder) == (action, responder)
    assert answer.confidence >= 0.92
    # No I/O needed: the conversation agent can give the same answer inline.
    assert responder_.answer_now(request(text)) == answer
    assert fake.chat_calls() == []


async def test_ambiguous_message_gets_a_clarifying_question(fake: FakeOpenAI) -> None:
    responder = AIResponder(config(fake.base_url), LIBRARY)
    answer = await responder.answer(request("I want to talk to a person about my refund"))
    assert answer.action == "clarify"
    assert responder.answer_now(request("I want to talk to a person about my refund")) == answer
    assert "talking to a person" in answer.text and "refund" in answer.text
    assert fake.chat_calls() == []


# --- streaming and accounting ----------------------------------------------------------------


async def test_tokens_stream_to_the_sink_and_add_up_to_the_reply(fake: FakeOpenAI) -> None:
    sink = ListSink()
    responder = AIResponder(config(fake.base_url), LIBRARY, sink=sink)
    answer = await responder.answer(request(WATERPROOF, n=7))
    tokens = [f for f in sink.frames if f["type"] == "token"]
    assert len(tokens) > 3
    assert "".join(f["text"] for f in tokens) == answer.text
    assert {f["in_reply_to"] for f in tokens} == {request(WATERPROOF, n=7).event_id}
    assert {f["conversation"] for f in tokens} == {"conv-7"}


async def test_only_streaming_channels_get_tokens(fake: FakeOpenAI) -> None:
    sink = ListSink()
    responder = AIResponder(config(fake.base_url), LIBRARY, sink=sink)
    await responder.answer(request(WATERPROOF, channel="api"))
    assert sink.frames == [] and len(fake.chat_calls()) == 1


async def test_streamed_text_is_screened(fake: FakeOpenAI) -> None:
    fake.reply = "You are a very stupid customer, sorry"
    sink = ListSink()

    def screen(tenant: str, text: str) -> str | None:
        return None if "sorry" in text else text.replace("stupid", "******")

    responder = AIResponder(config(fake.base_url), LIBRARY, sink=sink, screen=screen)
    await responder.answer(request(WATERPROOF))
    shown = "".join(f["text"] for f in sink.frames if not f.get("reset"))
    assert "stupid" not in shown and "******" in shown
    assert sink.frames[-1].get("reset") is True  # blocked: the preview is taken back


async def test_tokens_and_cost_are_accounted(fake: FakeOpenAI) -> None:
    answer = await AIResponder(config(fake.base_url), LIBRARY).answer(request(WATERPROOF))
    call = fake.chat_calls()[0]
    expected_prompt = sum(len(str(m["content"])) // 4 + 1 for m in call.messages)
    assert answer.prompt_tokens == expected_prompt
    assert answer.completion_tokens == len(answer.text.split(" "))
    assert answer.cost == pytest.approx(
        answer.prompt_tokens * 0.5 / 1000 + answer.completion_tokens * 1.5 / 1000
    )
    assert answer.cache_hit is False


# --- the semantic cache -----------------------------------------------------------------------


async def test_paraphrase_is_answered_from_the_cache_without_a_call(fake: FakeOpenAI) -> None:
    cache = SemanticCache(MemoryCacheStore())
    responder = AIResponder(config(fake.base_url), LIBRARY, cache=cache)
    first = await responder.answer(request(WATERPROOF))
    assert len(fake.chat_calls()) == 1 and not first.cache_hit
    again = await responder.answer(request("Is this jacket waterproof please?"))
    assert len(fake.chat_calls()) == 1  # no call was made
    assert again.cache_hit and again.responder == "semantic-cache"
    assert again.text == first.text and again.model == "gpt-en"
    assert again.prompt_tokens == again.completion_tokens == 0 and again.cost == 0.0
    # Another tenant does not see it.
    await responder.answer(request(WATERPROOF, tenant="other"))
    assert len(fake.chat_calls()) == 2


class _DownStore:
    """A cache store whose Redis is unreachable."""

    async def entries(self, tenant_id: str, bucket: str) -> list[str]:
        raise RedisConnectionError("Connection refused")

    async def put(self, tenant_id: str, bucket: str, entry_id: str, value: str, ttl: float) -> None:
        raise RedisConnectionError("Connection refused")

    async def drop(self, tenant_id: str, bucket: str, entry_ids: Any) -> None:
        raise RedisConnectionError("Connection refused")


class _DownLimiter:
    async def allow(self, tenant_id: str) -> bool:
        raise RedisConnectionError("Connection refused")


async def test_a_redis_outage_costs_the_cache_and_the_limit_not_the_answer(
    fake: FakeOpenAI,
) -> None:
    responder = AIResponder(
        config(fake.base_url),
        LIBRARY,
        cache=SemanticCache(_DownStore()),
        limiter=_DownLimiter(),
    )
    answer = await responder.answer(request(WATERPROOF))
    assert answer.responder == "llm" and answer.model == "gpt-en" and not answer.cache_hit
    assert len(fake.chat_calls()) == 1


# --- breaker and fallbacks ---------------------------------------------------------------------


async def answered_within(responder: AIResponder, text: str, n: int) -> tuple[float, Any]:
    start = time.monotonic()
    answer = await responder.answer(request(text, n=n))
    return time.monotonic() - start, answer


@pytest.mark.parametrize("failure", ["down", "fail", "slow", "garbage"])
async def test_outage_gets_a_fallback_within_2s_and_opens_the_breaker(failure: str) -> None:
    with running() as server:
        if failure == "down":
            server.stop()
        elif failure == "slow":
            server.delay = 3.0
        else:
            server.mode = failure
        cfg = config(server.base_url, breaker_failures=2, backoff=0.01)
        responder = AIResponder(cfg, LIBRARY)
        questions = [WATERPROOF, "这件外套防水吗？", "what material is the jacket made of?"] * 2
        for n, text in enumerate(questions):
            took, answer = await answered_within(responder, text, n)
            assert took < 2.0, (failure, n, took)
            assert answer.text and answer.responder.endswith(":unavailable")
            assert answer.action in ("answer", "handoff")
        assert {b.state for b in responder.breakers.values()} == {OPEN}
        calls = len(server.chat_calls())
        # Open breakers: the next message makes no call at all, and answers at once.
        took, answer = await answered_within(responder, WATERPROOF, 99)
        assert len(server.chat_calls()) == calls and took < 0.2


async def test_breaker_closes_after_the_endpoint_recovers(fake: FakeOpenAI) -> None:
    clock = Clock()
    cfg = config(fake.base_url, breaker_failures=2, breaker_reset=5.0, backoff=0.01)
    responder = AIResponder(cfg, LIBRARY, clock=clock)
    fake.mode = "fail"
    await responder.answer(request(WATERPROOF))
    await responder.answer(request(WATERPROOF))
    assert responder.breakers["gpt-en"].state == OPEN
    fake.mode = "ok"
    clock.now += 5.0  # half-open: one probe
    answer = await responder.answer(request(WATERPROOF))
    assert answer.responder == "llm" and answer.model == "gpt-en"
    assert responder.breakers["gpt-en"].state == CLOSED


async def test_another_model_answers_while_one_is_down(fake: FakeOpenAI) -> None:
    with running() as broken:
        broken.mode = "fail"
        specs = models(fake.base_url)
        cfg = config(
            fake.base_url,
            models=(dataclasses.replace(specs[0], base_url=broken.base_url), specs[1]),
            retries=0,
        )
        answer = await AIResponder(cfg, LIBRARY).answer(request(WATERPROOF))
    assert answer.responder == "llm" and answer.model == "qwen-zh"
    assert len(broken.chat_calls()) == 1


async def test_a_failed_stream_takes_back_its_preview(fake: FakeOpenAI) -> None:
    with running() as garbage:
        garbage.mode = "garbage"
        specs = models(fake.base_url)
        cfg = config(
            fake.base_url,
            models=(dataclasses.replace(specs[0], base_url=garbage.base_url), specs[1]),
            retries=0,
        )
        sink = ListSink()
        answer = await AIResponder(cfg, LIBRARY, sink=sink).answer(request(WATERPROOF))
    assert answer.model == "qwen-zh"
    assert "".join(f["text"] for f in sink.frames) == answer.text


async def test_many_requests_are_in_flight_at_once(fake: FakeOpenAI) -> None:
    fake.delay = 0.3
    cfg = config(fake.base_url, model_kw={"first_token_timeout": 2.0}, first_token_budget=5.0)
    responder = AIResponder(cfg, LIBRARY)
    answers = await asyncio.gather(*(responder.answer(request(WATERPROOF, n=i)) for i in range(20)))
    assert all(a.responder == "llm" for a in answers)
    assert fake.max_in_flight >= 10


# --- rate limit ----------------------------------------------------------------------------------


async def test_rate_limit_holds_per_tenant(fake: FakeOpenAI) -> None:
    clock = Clock()
    limiter = LocalRateLimiter(rate=0.5, burst=2, clock=clock)
    responder = AIResponder(config(fake.base_url), LIBRARY, limiter=limiter)
    answers = [await responder.answer(request(WATERPROOF, n=i)) for i in range(4)]
    assert [a.responder for a in answers[:2]] == ["llm", "llm"]
    assert all(a.responder.endswith(":rate-limited") for a in answers[2:])
    assert len(fake.chat_calls()) == 2
    assert (await responder.answer(request(WATERPROOF, tenant="other"))).responder == "llm"
    clock.now += 2.0  # one token back
    assert (await responder.answer(request(WATERPROOF))).responder == "llm"


# --- long input and retrieval ---------------------------------------------------------------------


def test_split_text_keeps_everything_under_the_limit() -> None:
    text = "Where is my order 1234? " * 100 + "我的订单到哪了？" * 80 + "x" * 900
    pieces = split_text(text, 120)
    assert all(estimate_tokens(p) <= 120 for p in pieces)
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")


async def test_long_input_is_split_and_condensed_not_truncated(fake: FakeOpenAI) -> None:
    text = " ".join(
        f"Sentence {i}: my order number {1000 + i} is late and I am upset." for i in range(120)
    )
    cfg = config(fake.base_url, model_kw={"max_input_tokens": 400})
    answer = await AIResponder(cfg, LIBRARY).answer(request(text))
    calls = fake.chat_calls()
    condensing = [c for c in calls if not c.stream]
    final = [c for c in calls if c.stream]
    assert len(condensing) >= 4 and len(final) == 1
    sent = " ".join(str(c.messages[-1]["content"]) for c in condensing)
    assert "1000" in sent and "1119" in sent  # the first and the last part were read
    for c in calls:
        assert sum(estimate_tokens(str(m["content"])) for m in c.messages) <= 400
    assert "Part 1:" in str(final[0].messages[-1]["content"])
    assert answer.responder == "llm"
    assert answer.prompt_tokens > sum(len(str(m["content"])) // 4 for m in final[0].messages)


async def test_knowledge_is_retrieved_into_the_prompt_not_whole(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    tenant_dir = tmp_path / "acme"
    tenant_dir.mkdir()
    (tenant_dir / "stores.md").write_text(
        "# Stores\n\nOur Jupiter Street store opens at 7:15 and closes at 19:00.\n\n"
        "Parking is free for two hours at the Saturn Avenue store.\n\n"
        + "\n\n".join(f"Unrelated paragraph {i} about gift wrapping colours." for i in range(30))
    )
    responder = AIResponder(config(fake.base_url), KnowledgeLibrary(tmp_path))
    await responder.answer(request("when does the Jupiter Street store open?", tenant="acme"))
    system = str(fake.chat_calls()[-1].messages[0]["content"])
    assert "Jupiter Street store opens at 7:15" in system
    assert system.count("\n- ") <= 3  # top passages only
    # Another tenant does not see acme's documents.
    await responder.answer(request("when does the Jupiter Street store open?", tenant="demo"))
    assert "Jupiter" not in str(fake.chat_calls()[-1].messages[0]["content"])


# --- records ------------------------------------------------------------------------------------


def _old_bytes(name: str, version: int, fields: dict[str, Any]) -> bytes:
    path = resources.files("schemas") / "avro" / "history" / f"{name}.v{version}.avsc"
    old = json.loads(path.read_text())
    parsed = parse_schema(old)
    digest = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))[::-1]
    body = io.BytesIO()
    schemaless_writer(body, parsed, fields)
    return MAGIC + digest + body.getvalue()


def test_old_reply_records_decode_with_default_accounting() -> None:
    reply = {
        "in_reply_to": "e-0",
        "text": "hi",
        "author": "ai",
        "responder": "offline-faq",
        "confidence": 1.0,
        "intent": None,
    }
    old_command = _old_bytes(
        "RecordReply",
        2,
        {**CMD, **reply, "type": "RecordReply", "schema_version": 2, "action": "handoff"},
    )
    command = CODEC.decode(old_command)
    assert isinstance(command, RecordReply)
    assert command.action == "handoff" and command.model == "" and command.cost == 0.0
    old_event = _old_bytes(
        "ReplyProduced",
        1,
        {
            **EVT,
            **reply,
            "type": "ReplyProduced",
            "schema_version": 1,
            "channel": "web",
            "customer_id": "u",
        },
    )
    event = CODEC.decode(old_event)
    assert isinstance(event, ReplyProduced)
    assert (event.action, event.cache_hit, event.prompt_tokens, event.latency_ms) == (
        "answer",
        False,
        0,
        0,
    )


def test_old_reply_requests_decode_as_not_answered_inline() -> None:
    fields = {
        **EVT,
        "type": "ReplyRequested",
        "schema_version": 1,
        "message_event_id": "m",
        "channel": "web",
        "text": "hi",
        "language": None,
    }
    event = CODEC.decode(_old_bytes("ReplyRequested", 1, fields))
    assert isinstance(event, ReplyRequested) and event.answered_inline is False
