"""Semantic cache: same tenant, intent and language; similar question; expiry."""

from __future__ import annotations

from streams.llm import KnowledgeLibrary
from streams.semantic_cache import MemoryCacheStore, SemanticCache, bucket_for

KNOWLEDGE = KnowledgeLibrary().get("demo")
VECTOR = KNOWLEDGE.classifier.vectorizer.vector


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def cache(clock: Clock, **kw: float) -> SemanticCache:
    return SemanticCache(MemoryCacheStore(clock), clock=clock, **kw)  # type: ignore[arg-type]


async def test_paraphrase_hits_the_same_intent_and_language() -> None:
    clock = Clock()
    c = cache(clock, ttl=60.0)
    await c.store("t1", "product_question", "en", "is this jacket waterproof?", "Yes.", "gpt-en")
    q = "Is this jacket waterproof please"
    hit = await c.lookup("t1", "product_question", "en", VECTOR(q), VECTOR)
    assert hit is not None and hit.answer == "Yes." and hit.model == "gpt-en"
    assert hit.similarity >= 0.75
    # Not for another tenant, another intent or another language.
    assert await c.lookup("t2", "product_question", "en", VECTOR(q), VECTOR) is None
    assert await c.lookup("t1", "warranty", "en", VECTOR(q), VECTOR) is None
    assert await c.lookup("t1", "product_question", "zh", VECTOR(q), VECTOR) is None


async def test_a_different_question_of_the_same_intent_misses() -> None:
    c = cache(Clock())
    await c.store("t1", "product_question", "en", "is this jacket waterproof?", "Yes.", "m")
    q = "what size jacket should I buy"
    assert await c.lookup("t1", "product_question", "en", VECTOR(q), VECTOR) is None


async def test_chinese_paraphrase_hits() -> None:
    c = cache(Clock())
    await c.store("t1", "product_question", "zh", "这件外套防水吗", "防水。", "qwen-zh")
    hit = await c.lookup("t1", "product_question", "zh", VECTOR("这件外套防不防水"), VECTOR)
    assert hit is not None and hit.answer == "防水。"


async def test_entries_expire() -> None:
    clock = Clock()
    c = cache(clock, ttl=10.0)
    await c.store("t1", "refund", "en", "refund please", "R", "m")
    assert await c.lookup("t1", "refund", "en", VECTOR("refund please"), VECTOR)
    clock.now += 10.5
    assert await c.lookup("t1", "refund", "en", VECTOR("refund please"), VECTOR) is None


async def test_open_questions_need_near_identity() -> None:
    c = cache(Clock())
    await c.store("t1", None, "en", "tell me about your company history", "A", "m")
    same = VECTOR("Tell me about your company history")
    near = VECTOR("tell me about your company culture")
    assert await c.lookup("t1", None, "en", same, VECTOR)
    assert await c.lookup("t1", None, "en", near, VECTOR) is None
    assert bucket_for(None, "en") == "_open:en"


async def test_buckets_are_capped_oldest_first() -> None:
    clock = Clock()
    store = MemoryCacheStore(clock)
    c = SemanticCache(store, max_entries=3, clock=clock)
    for i in range(5):
        clock.now += 1
        await c.store("t1", "refund", "en", f"refund question number {i}", str(i), "m")
    held = await store.entries("t1", bucket_for("refund", "en"))
    assert len(held) == 3
    assert all('"question": "refund question number 0"' not in v for v in held)


async def test_unreadable_entries_are_ignored() -> None:
    store = MemoryCacheStore()
    await store.put("t1", "refund:en", "x", "{not json", 60)
    c = SemanticCache(store)
    assert await c.lookup("t1", "refund", "en", VECTOR("refund"), VECTOR) is None
