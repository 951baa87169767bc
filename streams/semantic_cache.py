"""Semantic cache: a repeated or paraphrased question gets the earlier model answer.

Entries are grouped in buckets of one tenant, one intent and one language, so a cached
answer is only ever offered for the same kind of question in the same language; inside
a bucket the question with the highest cosine similarity wins if it clears the
threshold. Entries expire (``ttl``). Storage is injected (``CacheStore``): the worker
uses Redis (``connectors.ai_store``) so every worker shares one cache; tests and the
embedded default can use ``MemoryCacheStore``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from streams.intents import SparseVector, normalize


class CacheStore(Protocol):
    async def entries(self, tenant_id: str, bucket: str) -> Sequence[str | bytes]: ...

    async def put(
        self, tenant_id: str, bucket: str, entry_id: str, value: str, ttl: float
    ) -> None: ...

    async def drop(self, tenant_id: str, bucket: str, entry_ids: Sequence[str]) -> None: ...


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    entry_id: str
    question: str
    answer: str
    model: str
    intent: str
    language: str
    created_at: float  # epoch seconds
    expires_at: float
    similarity: float = 0.0  # filled in on a hit


class MemoryCacheStore:
    """In-process store: fine for one worker and for tests."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._data: dict[tuple[str, str], dict[str, tuple[str, float]]] = {}
        self._clock = clock

    async def entries(self, tenant_id: str, bucket: str) -> list[str]:
        now = self._clock()
        held = self._data.get((tenant_id, bucket), {})
        return [v for v, expires in held.values() if expires > now]

    async def put(self, tenant_id: str, bucket: str, entry_id: str, value: str, ttl: float) -> None:
        held = self._data.setdefault((tenant_id, bucket), {})
        held[entry_id] = (value, self._clock() + ttl)

    async def drop(self, tenant_id: str, bucket: str, entry_ids: Sequence[str]) -> None:
        held = self._data.get((tenant_id, bucket), {})
        for entry_id in entry_ids:
            held.pop(entry_id, None)


def bucket_for(intent: str | None, language: str) -> str:
    return f"{intent or '_open'}:{language}"


class SemanticCache:
    def __init__(
        self,
        store: CacheStore,
        ttl: float = 3600.0,
        similarity: float = 0.75,
        open_similarity: float = 0.92,
        max_entries: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.ttl = ttl
        self._similarity = similarity
        # Questions without a recognised intent share one bucket: demand near-identity.
        self._open_similarity = open_similarity
        self._max_entries = max_entries
        self._clock = clock
        self._parsed: dict[str | bytes, CachedAnswer] = {}
        self._buckets: dict[tuple[str, str], _BucketIndex] = {}
        self._vectors: dict[tuple[str, str], SparseVector] = {}

    async def lookup(
        self,
        tenant_id: str,
        intent: str | None,
        language: str,
        vector: SparseVector,
        vectorize: Callable[[str], SparseVector],
    ) -> CachedAnswer | None:
        bucket = bucket_for(intent, language)
        raw = await self._store.entries(tenant_id, bucket)
        index = self._index(tenant_id, bucket, raw, vectorize)
        now = self._clock()
        expired = [e.entry_id for e in index.entries if e.expires_at <= now]
        if expired:
            await self._store.drop(tenant_id, bucket, expired)
        dots: defaultdict[int, float] = defaultdict(float)
        for term, weight in vector.items():
            for position, stored in index.postings.get(term, ()):
                dots[position] += weight * stored
        threshold = self._similarity if intent else self._open_similarity
        for position, score in sorted(dots.items(), key=lambda x: -x[1]):
            if score < threshold:
                break
            best = index.entries[position]
            if best.expires_at > now:
                return CachedAnswer(**{**asdict(best), "similarity": round(score, 4)})
        return None

    def _index(
        self,
        tenant_id: str,
        bucket: str,
        raw: Sequence[str | bytes],
        vectorize: Callable[[str], SparseVector],
    ) -> _BucketIndex:
        """An inverted index of the bucket's questions, rebuilt only when the bucket
        changed: a hit costs one store round trip and a sparse dot product."""
        signature = hash(tuple(raw))
        known = self._buckets.get((tenant_id, bucket))
        if known is not None and known.signature == signature:
            return known
        self._trim()
        entries = [e for value in raw if (e := self._parse(value)) is not None]
        postings: defaultdict[str, list[tuple[int, float]]] = defaultdict(list)
        for position, entry in enumerate(entries):
            key = (tenant_id, entry.entry_id)
            stored = self._vectors.get(key)
            if stored is None:
                stored = self._vectors[key] = vectorize(entry.question)
            for term, weight in stored.items():
                postings[term].append((position, weight))
        index = _BucketIndex(signature, entries, dict(postings))
        self._buckets[(tenant_id, bucket)] = index
        return index

    async def store(
        self,
        tenant_id: str,
        intent: str | None,
        language: str,
        question: str,
        answer: str,
        model: str,
    ) -> None:
        bucket = bucket_for(intent, language)
        entry_id = hashlib.sha1(f"{bucket}\n{normalize(question)}".encode()).hexdigest()[:20]
        now = self._clock()
        entry = CachedAnswer(
            entry_id, question, answer, model, intent or "", language, now, now + self.ttl
        )
        value = json.dumps(asdict(entry), ensure_ascii=False)
        await self._store.put(tenant_id, bucket, entry_id, value, self.ttl)
        if self._max_entries:
            held = [
                e for v in await self._store.entries(tenant_id, bucket) if (e := self._parse(v))
            ]
            if len(held) > self._max_entries:
                held.sort(key=lambda e: e.created_at)
                surplus = held[: len(held) - self._max_entries]
                await self._store.drop(tenant_id, bucket, [e.entry_id for e in surplus])

    def _parse(self, value: str | bytes) -> CachedAnswer | None:
        entry = self._parsed.get(value)
        if entry is None:
            try:
                data = json.loads(value)
                data.pop("similarity", None)
                entry = CachedAnswer(**data)
            except (ValueError, TypeError):
                return None  # written by something else: ignore rather than fail a reply
            self._parsed[value] = entry
        return entry

    def _trim(self) -> None:
        # Memos grow with distinct entries; entries expire, so start over now and then.
        if len(self._parsed) > 20_000:
            self._parsed.clear()
        if len(self._vectors) > 20_000:
            self._vectors.clear()
        if len(self._buckets) > 2_000:
            self._buckets.clear()


@dataclass(frozen=True, slots=True)
class _BucketIndex:
    signature: int
    entries: list[CachedAnswer]
    postings: dict[str, list[tuple[int, float]]]
