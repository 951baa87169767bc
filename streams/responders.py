"""Responders turn a reply request into a reply. The offline FAQ responder needs no
API key and answers from a packaged knowledge base; it stays the default when no model
is configured. The AI responder (``streams.llm``) implements the same protocol."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

from schemas.config import ConfigState, faq_score
from schemas.ids import uuid5_text
from schemas.records import RecordReply, ReplyRequested

_WORD = re.compile(r"[a-z0-9']+")
_HAN = re.compile(r"[\u4e00-\u9fff]")
_REPLY_NAMESPACE = uuid.UUID("0b8f5a8e-2f4e-4f0c-8d7e-5b1c9e3a6d42")


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    responder: str
    confidence: float
    intent: str | None
    action: str = "answer"  # answer | clarify | handoff (routing acts on it)
    model: str = ""  # the model that wrote the text, if any
    cache_hit: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0


class Responder(Protocol):
    async def answer(self, request: ReplyRequested) -> Answer: ...

    def answer_now(self, request: ReplyRequested) -> Answer | None:
        """The answer when it needs no I/O (CPU only, microseconds: a FAQ entry, an
        intent's canned text), else None. The conversation agent calls it inline, so
        it must never block."""
        ...


def reply_command_id(request_event_id: str) -> str:
    """One reply per request: a redelivered request cannot produce a second one."""
    return uuid5_text(_REPLY_NAMESPACE, request_event_id)


def reply_command(
    request: ReplyRequested, answer: Answer, issued_at: int, latency_ms: int
) -> RecordReply:
    return RecordReply(
        command_id=reply_command_id(request.event_id),
        conversation_id=request.conversation_id,
        tenant_id=request.tenant_id,
        issued_at=issued_at,
        in_reply_to=request.event_id,
        text=answer.text,
        author="ai",
        responder=answer.responder,
        confidence=answer.confidence,
        intent=answer.intent,
        action=answer.action,
        model=answer.model,
        cache_hit=answer.cache_hit,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        cost=answer.cost,
        latency_ms=latency_ms,
    )


def language_of(text: str) -> str:
    han = len(_HAN.findall(text))
    return "zh" if han and han * 3 >= len(text.strip()) else "en"


def features(text: str) -> set[str]:
    """Words for Latin text, character bigrams (and single chars) for Chinese."""
    lowered = text.lower()
    found = set(_WORD.findall(lowered))
    han = "".join(_HAN.findall(lowered))
    found.update(han)
    found.update(han[i : i + 2] for i in range(len(han) - 1))
    return found


@dataclass(frozen=True, slots=True)
class FaqEntry:
    intent: str
    features: frozenset[str]
    answers: dict[str, str]
    keywords: tuple[str, ...] = ()  # lower case; a tenant's entries only
    question: str = ""  # lower case, stripped; a tenant's entries only


def load_faq(path: str | None = None) -> list[FaqEntry]:
    text = (
        open(path, encoding="utf-8").read()  # noqa: SIM115
        if path
        else (resources.files("streams") / "knowledge" / "faq.json").read_text("utf-8")
    )
    entries = []
    for item in json.loads(text):
        feats: set[str] = set()
        for question in item["questions"]:
            feats |= features(question)
        entries.append(FaqEntry(item["intent"], frozenset(feats), dict(item["answer"])))
    return entries


HUMAN_INTENT = "human_agent"  # the customer asks for a person: hand off

FALLBACK = {
    "en": "Thanks for your message. I couldn't find an answer; a colleague will follow up.",
    "zh": "感谢您的留言，暂时没有找到答案，稍后会有同事跟进。",
}


class OfflineResponder:
    """FAQ retrieval by feature overlap: deterministic, instant, no network."""

    name = "offline-faq"

    def __init__(self, entries: Sequence[FaqEntry] | None = None, threshold: float = 0.2):
        self._entries = list(entries) if entries is not None else load_faq()
        self._threshold = threshold

    async def answer(self, request: ReplyRequested) -> Answer:
        return self.answer_now(request)

    def answer_now(self, request: ReplyRequested) -> Answer:
        return self.answer_text(request.text, request.language)

    def answer_text(self, text: str, language: str | None = None) -> Answer:
        lang = language if language in ("en", "zh") else language_of(text)
        asked = features(text)
        best: FaqEntry | None = None
        best_score = 0.0
        for entry in self._entries:
            overlap = len(asked & entry.features)
            score = overlap / (len(asked) or 1)
            if score > best_score:
                best, best_score = entry, score
        if best is None or best_score < self._threshold:
            return Answer(FALLBACK[lang], self.name, best_score, None, "clarify")
        text_out = best.answers.get(lang) or next(iter(best.answers.values()))
        action = "handoff" if best.intent == HUMAN_INTENT else "answer"
        return Answer(text_out, self.name, round(best_score, 3), best.intent, action)


class TenantFaq:
    """The FAQ a tenant's admin wrote in /admin (config kind ``faq``: question, answer,
    keywords, intent), asked before the responder it wraps: an explicit answer to a
    question that matches it well wins, anything else goes on as before. Live: the
    entries are rebuilt when the configuration changed (``ConfigState.applied``), and
    the tenant's ``min_confidence`` (config kind ``ai``) is the bar when it set one.

    The score is /admin's "try a question"'s (``schemas.config.faq_score``)."""

    name = "tenant-faq"

    def __init__(self, inner: Responder, config: ConfigState, threshold: float = 0.5) -> None:
        self._inner = inner
        self._config = config
        self._threshold = threshold
        self._cache: dict[str, tuple[int, list[FaqEntry]]] = {}

    def entries(self, tenant: str) -> list[FaqEntry]:
        cached = self._cache.get(tenant)
        if cached is not None and cached[0] == self._config.applied:
            return cached[1]
        built = []
        for entry_id, data in self._config.all(tenant, "faq").items():
            answer = str(data.get("answer") or "")
            if not answer:
                continue
            question = str(data.get("question") or "")
            keywords = tuple(str(k).lower() for k in data.get("keywords") or () if str(k))
            feats = features(question) | set(keywords)
            intent = str(data.get("intent") or f"faq:{entry_id}")
            built.append(
                FaqEntry(
                    intent,
                    frozenset(feats),
                    {"zh": answer, "en": answer},
                    keywords,
                    question.strip().lower(),
                )
            )
        self._cache[tenant] = (self._config.applied, built)
        return built

    def _match(self, request: ReplyRequested) -> Answer | None:
        entries = self.entries(request.tenant_id)
        if not entries:
            return None
        asked = features(request.text)
        best, best_score = None, 0.0
        for entry in entries:
            score = faq_score(asked, entry.features, request.text, entry.keywords, entry.question)
            if score > best_score:
                best, best_score = entry, score
        if best is None or best_score < self.threshold(request.tenant_id):
            return None
        action = "handoff" if best.intent == HUMAN_INTENT else "answer"
        return Answer(best.answers["zh"], self.name, round(best_score, 3), best.intent, action)

    def threshold(self, tenant: str) -> float:
        """The tenant's ``min_confidence`` from /admin (live), else the default."""
        value = (self._config.get(tenant, "ai") or {}).get("min_confidence")
        return float(value) if isinstance(value, int | float) else self._threshold

    async def answer(self, request: ReplyRequested) -> Answer:
        return self._match(request) or await self._inner.answer(request)

    def answer_now(self, request: ReplyRequested) -> Answer | None:
        return self._match(request) or self._inner.answer_now(request)
