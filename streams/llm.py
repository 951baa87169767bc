"""The AI responder: intent first, then the FAQ, the semantic cache or a model.

For each reply request:

1. The tenant's intent classifier decides (``streams.intents.decide``): hand off, answer
   from the FAQ, ask a clarifying question, or go to a model.
2. A model answer is first looked up in the semantic cache (same tenant, intent and
   language; similar question): a hit makes no model call.
3. Otherwise, within the tenant's rate limit, the models chosen for the message
   (rules, then language) are tried in order, each behind its circuit breaker, with a
   short first-token deadline and bounded retries. Tokens stream to the customer's
   socket as they arrive (``TokenSink``); the final text is one ``RecordReply``.
4. If no model can answer in time, the offline FAQ responder answers, or the
   conversation is handed off: the customer always hears back.

Long messages are split to the model's input limit: each part is condensed by the
model, and the answer is written from the condensed parts (nothing is cut silently).
The tenant's knowledge base (FAQ and documents in files) goes into the prompt by
retrieval: only the passages nearest to the question.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, cast

from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from schemas.records import ReplyRequested
from streams import metrics
from streams.breaker import CircuitBreaker, RateLimiter, backoff
from streams.intents import (
    CLARIFY,
    FAQ,
    HANDOFF,
    Decision,
    IntentClassifier,
    IntentSpec,
    SparseVector,
    Vectorizer,
    clarifying_question,
    cosine,
    decide,
    load_intents,
    with_answers,
)
from streams.responders import FALLBACK, Answer, FaqEntry, OfflineResponder, language_of, load_faq
from streams.semantic_cache import SemanticCache

log = logging.getLogger(__name__)

HANDOFF_TEXT = {
    "en": "I'll get a colleague to help you with this; please stay in the chat.",
    "zh": "我为您转接人工客服，请稍候。",
}
LANGUAGE_NAMES = {"en": "English", "zh": "Simplified Chinese"}

# --- configuration (built from kefu.settings by the worker) --------------------------


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str  # the label rules, breakers and events use
    model: str  # the model id sent to the endpoint
    base_url: str
    api_key: str = ""
    languages: tuple[str, ...] = ()  # empty: any language
    cost_in: float = 0.0  # per 1000 prompt tokens
    cost_out: float = 0.0  # per 1000 completion tokens
    max_input_tokens: int = 8000
    max_output_tokens: int = 1024
    timeout: float = 30.0  # a whole call
    first_token_timeout: float = 5.0  # and the wait for each next chunk

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        spent = prompt_tokens * self.cost_in + completion_tokens * self.cost_out
        return round(spent / 1000, 8)


@dataclass(frozen=True, slots=True)
class Rule:
    """Send matching messages to ``model`` first. Empty conditions match anything."""

    model: str
    tenant: str = ""
    language: str = ""
    intent: str = ""
    pattern: str = ""  # a regular expression searched in the message


@dataclass(frozen=True, slots=True)
class Tuning:
    temperature: float = 0.4
    max_tokens: int = 512
    system_prompt: str = ""
    # A configured model's label (tried first) or the model id to ask the endpoints
    # for; "" keeps the configured choice (rules, then language).
    model: str = ""
    # The intent threshold (answer / ask / hand off); None: ``AIConfig.intent_threshold``.
    min_confidence: float | None = None


@dataclass(frozen=True, slots=True)
class AIConfig:
    models: tuple[ModelSpec, ...] = ()
    rules: tuple[Rule, ...] = ()
    tuning: Tuning = Tuning()
    tenants: Mapping[str, Tuning] = field(default_factory=dict)
    intent_threshold: float = 0.92
    clarify_floor: float = 0.25
    retries: int = 1  # per model, after the first attempt
    backoff: float = 0.1
    # The longest a customer waits for the first token before the fallback answers,
    # across every attempt and model.
    first_token_budget: float = 1.5
    breaker_failures: int = 3
    breaker_reset: float = 10.0
    stream_channels: tuple[str, ...] = ("web",)
    retrieval_passages: int = 3

    def tuning_for(self, tenant_id: str) -> Tuning:
        return self.tenants.get(tenant_id, self.tuning)

    def threshold_for(self, tenant_id: str) -> float:
        """The tenant's intent threshold: its own (/admin's ``min_confidence``) if set."""
        own = self.tuning_for(tenant_id).min_confidence
        return self.intent_threshold if own is None else own


def select_models(
    config: AIConfig, tenant_id: str, language: str, intent: str | None, text: str
) -> list[ModelSpec]:
    """The models to try, in order: the tenant's chosen model (/admin's ``model``, when
    it is a configured label), a matching rule's model, then the models that speak the
    language, then the rest (a fallback is better than no answer)."""
    by_name = {m.name: m for m in config.models}
    order: list[ModelSpec] = []
    chosen = config.tuning_for(tenant_id).model
    if chosen in by_name:
        order.append(by_name[chosen])
    for rule in config.rules:
        if (
            (not rule.tenant or rule.tenant == tenant_id)
            and (not rule.language or rule.language == language)
            and (not rule.intent or rule.intent == intent)
            and (not rule.pattern or re.search(rule.pattern, text, re.IGNORECASE))
            and rule.model in by_name
        ):
            if by_name[rule.model] not in order:
                order.append(by_name[rule.model])
            break
    order += [m for m in config.models if language in m.languages and m not in order]
    order += [m for m in config.models if not m.languages and m not in order]
    order += [m for m in config.models if m not in order]
    return order


# --- token estimates and splitting ----------------------------------------------------

_HAN = re.compile(r"[\u3400-\u9fff]")
_SENTENCE_END = re.compile(r"(?<=[。！？!?；;.\n])\s*")


def estimate_tokens(text: str) -> int:
    """About one token per Chinese character and per four other characters: close
    enough to budget a prompt without shipping a tokenizer."""
    han = len(_HAN.findall(text))
    return han + math.ceil((len(text) - han) / 4)


def split_text(text: str, max_tokens: int) -> list[str]:
    """Pieces of at most ``max_tokens`` (estimated), cut at sentence ends where
    possible; every character of ``text`` is in exactly one piece."""
    max_tokens = max(1, max_tokens)
    sentences = [s for s in _SENTENCE_END.split(text) if s]
    pieces: list[str] = []
    current = ""
    for sentence in sentences:
        while estimate_tokens(sentence) > max_tokens:  # one overlong sentence: hard cut
            cut = max(1, int(len(sentence) * max_tokens / estimate_tokens(sentence)))
            while cut > 1 and estimate_tokens(sentence[:cut]) > max_tokens:
                cut -= 1
            if current:
                pieces.append(current)
                current = ""
            pieces.append(sentence[:cut])
            sentence = sentence[cut:]
        joined = f"{current} {sentence}" if current else sentence
        if estimate_tokens(joined) > max_tokens:
            pieces.append(current)
            current = sentence
        else:
            current = joined
    if current:
        pieces.append(current)
    return pieces


# --- knowledge ------------------------------------------------------------------------


class KnowledgeBase:
    """Passages (FAQ answers with their questions, document paragraphs) retrieved by
    TF-IDF cosine similarity."""

    def __init__(self, passages: Sequence[str]) -> None:
        self.passages = list(passages)
        self._vectorizer = Vectorizer(self.passages)
        self._vectors = [self._vectorizer.vector(p) for p in self.passages]

    def retrieve(self, question: str, k: int = 3, max_tokens: int = 800) -> list[str]:
        if not self.passages:
            return []
        asked = self._vectorizer.vector(question)
        scored = sorted(
            ((cosine(asked, v), i) for i, v in enumerate(self._vectors)), key=lambda x: -x[0]
        )
        out: list[str] = []
        used = 0
        for score, index in scored[:k]:
            if score <= 0.05:
                break
            passage = self.passages[index]
            cost = estimate_tokens(passage)
            if used + cost > max_tokens:
                break
            out.append(passage)
            used += cost
        return out


def _paragraphs(text: str, size: int = 600) -> list[str]:
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        block = " ".join(block.split())
        if block:
            out += split_text(block, size // 2) if len(block) > size else [block]
    return out


@dataclass(frozen=True, slots=True)
class TenantKnowledge:
    specs: Mapping[str, IntentSpec]
    classifier: IntentClassifier
    faq: Sequence[FaqEntry]
    base: KnowledgeBase
    offline: OfflineResponder

    def answer_for(self, intent: str, language: str) -> str | None:
        answers = self.specs[intent].answer
        return answers.get(language) or answers.get("en")


def load_knowledge(directory: Path | None) -> TenantKnowledge:
    """A tenant's directory: ``intents.json`` and ``faq.json`` (each optional: the
    packaged defaults stand in) and any ``*.md`` / ``*.txt`` documents."""
    intents_file = directory / "intents.json" if directory else None
    faq_file = directory / "faq.json" if directory else None
    specs = load_intents(intents_file if intents_file and intents_file.exists() else None)
    faq = load_faq(str(faq_file) if faq_file and faq_file.exists() else None)
    faq_raw = json.loads(
        faq_file.read_text("utf-8")
        if faq_file and faq_file.exists()
        else (resources.files("streams") / "knowledge" / "faq.json").read_text("utf-8")
    )
    passages = []
    faq_answers: dict[str, dict[str, str]] = {}
    for item in faq_raw:
        faq_answers[item["intent"]] = dict(item["answer"])
        for lang, answer in item["answer"].items():
            questions = " / ".join(q for q in item["questions"] if language_of(q) == lang)
            passages.append(f"Q: {questions}\nA: {answer}" if questions else answer)
    for spec in specs:
        for lang, answer in spec.answer.items():
            passages.append(f"Q: {' / '.join(spec.examples.get(lang, ())[:4])}\nA: {answer}")
    if directory and directory.is_dir():
        for doc in sorted([*directory.glob("*.md"), *directory.glob("*.txt")]):
            passages += _paragraphs(doc.read_text("utf-8"))
    specs = with_answers(specs, faq_answers)
    examples = [(t, i) for spec in specs for t, i, _ in spec.labelled()]
    return TenantKnowledge(
        specs={s.intent: s for s in specs},
        classifier=IntentClassifier(examples),
        faq=faq,
        base=KnowledgeBase(passages),
        offline=OfflineResponder(faq),
    )


class KnowledgeLibrary:
    """Per-tenant knowledge, loaded (and the classifier trained) on first use.
    ``root/<tenant>/`` holds a tenant's files; without it the packaged set is used."""

    def __init__(self, root: Path | None = None) -> None:
        self._root = root
        self._loaded: dict[str, TenantKnowledge] = {}
        # tenant -> its knowledge, resolved once: the conversation agent asks per
        # message (inline answers), and a stat per message would be I/O on that path.
        self._by_tenant: dict[str, TenantKnowledge] = {}

    def get(self, tenant_id: str) -> TenantKnowledge:
        known = self._by_tenant.get(tenant_id)
        if known is None:
            directory = self._root / tenant_id if self._root else None
            key = tenant_id if directory and directory.is_dir() else ""
            known = self._loaded.get(key)
            if known is None:
                known = self._loaded[key] = load_knowledge(directory if key else None)
            self._by_tenant[tenant_id] = known
        return known


# --- model calls ------------------------------------------------------------------------


class ModelFailure(Exception):
    """A model call that produced no usable answer (empty, garbage, cut off)."""


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


OnText = Callable[[str], Awaitable[None]]
Messages = list[dict[str, str]]


class ChatEndpoint:
    """One model behind an OpenAI-compatible endpoint. No SDK retries: the responder
    retries, so a breaker sees every failure."""

    def __init__(self, spec: ModelSpec, client: AsyncOpenAI | None = None) -> None:
        self.spec = spec
        self._client = client or AsyncOpenAI(
            api_key=spec.api_key or "unused",
            base_url=spec.base_url,
            max_retries=0,
            timeout=spec.timeout,
        )

    async def stream(
        self,
        messages: Messages,
        temperature: float,
        max_tokens: int,
        on_text: OnText,
        first_token_timeout: float,
        model: str = "",
    ) -> Completion:
        """``model``: the model id to ask for instead of the spec's (a tenant's choice)."""
        parts: list[str] = []
        usage: Any = None
        async with asyncio.timeout(self.spec.timeout):
            response = await asyncio.wait_for(
                self._client.chat.completions.create(
                    model=model or self.spec.model,
                    messages=cast(list[ChatCompletionMessageParam], messages),
                    temperature=temperature,
                    max_tokens=max_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                ),
                first_token_timeout,
            )
            try:
                chunks = response.__aiter__()
                while True:
                    wait = first_token_timeout if not parts else self.spec.first_token_timeout
                    try:
                        chunk = await asyncio.wait_for(chunks.__anext__(), wait)
                    except StopAsyncIteration:
                        break
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        delta = choice.delta.content if choice.delta else None
                        if delta:
                            parts.append(delta)
                            await on_text(delta)
            finally:
                await response.close()
        return self._completion(messages, "".join(parts), usage)

    async def complete(
        self, messages: Messages, temperature: float, max_tokens: int, model: str = ""
    ) -> Completion:
        response = await asyncio.wait_for(
            self._client.chat.completions.create(
                model=model or self.spec.model,
                messages=cast(list[ChatCompletionMessageParam], messages),
                temperature=temperature,
                max_tokens=max_tokens,
            ),
            self.spec.timeout,
        )
        if not getattr(response, "choices", None):
            raise ModelFailure("response without choices")
        text = response.choices[0].message.content or ""
        return self._completion(messages, text, response.usage)

    @staticmethod
    def _completion(messages: Messages, text: str, usage: Any) -> Completion:
        if not text.strip():
            raise ModelFailure("empty answer")
        if usage is not None:
            return Completion(text, int(usage.prompt_tokens), int(usage.completion_tokens))
        prompt = sum(estimate_tokens(m["content"]) + 4 for m in messages)
        return Completion(text, prompt, estimate_tokens(text))


def _model_id(config: AIConfig, tuning: Tuning) -> str:
    """The model id a tenant asks the endpoints for: its ``model`` when that is not one
    of the configured labels (a label only moves that model first), else ""."""
    chosen = tuning.model
    return "" if not chosen or any(m.name == chosen for m in config.models) else chosen


# --- streaming to the customer -----------------------------------------------------------


class TokenSink(Protocol):
    """Where streamed chunks go (the worker publishes them to the conversation's
    outbox channel, which the web-chat socket relays). Chunks are not events."""

    async def send(
        self, tenant_id: str, conversation_id: str, frame: Mapping[str, Any]
    ) -> None: ...


# (tenant, text so far) -> the text the customer may see, or None to stop streaming.
Screen = Callable[[str, str], str | None]


class _Stream:
    """Sends one reply's chunks through moderation: the customer sees the screened
    text; if screening rewrites what was already shown, a ``reset`` frame replaces it."""

    def __init__(
        self, sink: TokenSink | None, screen: Screen | None, request: ReplyRequested
    ) -> None:
        self._sink = sink
        self._screen = screen
        self._request = request
        self._raw = ""
        self._shown = ""
        self._stopped = sink is None

    async def __call__(self, chunk: str) -> None:
        self._raw += chunk
        if self._stopped or self._sink is None:
            return
        screened = self._screen(self._request.tenant_id, self._raw) if self._screen else self._raw
        if screened is None:
            self._stopped = True
            await self._frame("", reset=True)
            return
        if screened.startswith(self._shown):
            delta, self._shown = screened[len(self._shown) :], screened
            if delta:
                await self._frame(delta)
        else:
            self._shown = screened
            await self._frame(screened, reset=True)

    async def abandon(self) -> None:
        """A failed attempt: take back what it showed."""
        if self._shown and not self._stopped:
            await self._frame("", reset=True)
        self._raw = self._shown = ""

    async def _frame(self, text: str, reset: bool = False) -> None:
        assert self._sink is not None
        frame: dict[str, Any] = {
            "type": "token",
            "in_reply_to": self._request.event_id,
            "text": text,
        }
        if reset:
            frame["reset"] = True
        try:
            await self._sink.send(self._request.tenant_id, self._request.conversation_id, frame)
        except Exception:  # streaming is best effort: the final reply is the truth
            log.warning("token sink failed for %s", self._request.conversation_id)
            self._stopped = True


# --- the responder ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Generated:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: float


@dataclass(frozen=True, slots=True)
class _Read:
    """A request as the intent classifier read it, and its answer if that needs no I/O."""

    lang: str
    knowledge: TenantKnowledge
    vector: SparseVector
    decision: Decision
    immediate: Answer | None


class AIResponder:
    name = "ai"

    def __init__(
        self,
        config: AIConfig,
        library: KnowledgeLibrary | None = None,
        cache: SemanticCache | None = None,
        limiter: RateLimiter | None = None,
        sink: TokenSink | None = None,
        screen: Screen | None = None,
        endpoints: Mapping[str, ChatEndpoint] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.library = library or KnowledgeLibrary()
        self.cache = cache
        self._limiter = limiter
        self._sink = sink
        self._screen = screen
        self._clock = clock
        self.endpoints = dict(endpoints or {m.name: ChatEndpoint(m) for m in config.models})
        self.breakers = {
            m.name: CircuitBreaker(m.name, config.breaker_failures, config.breaker_reset, clock)
            for m in config.models
        }
        metrics.watch_breakers(self.breakers.values())

    def answer_now(self, request: ReplyRequested) -> Answer | None:
        """The intent's own answer (hand off, FAQ text, a clarifying question): no
        I/O, so the conversation agent gives it inline. None when a model is needed
        (the cache and the model calls stay in the responder agent)."""
        return self._read(request).immediate

    async def answer(self, request: ReplyRequested) -> Answer:
        read = self._read(request)
        if read.immediate is not None:
            return read.immediate
        text, lang, knowledge, decision = request.text, read.lang, read.knowledge, read.decision
        confidence = decision.confidence

        # A model answer: from the cache if this was asked before.
        cacheable = self.cache is not None and estimate_tokens(text) <= 200
        if self.cache is not None and cacheable:
            vectorize = knowledge.classifier.vectorizer.vector
            try:
                hit = await self.cache.lookup(
                    request.tenant_id, decision.intent, lang, read.vector, vectorize
                )
            except Exception:  # a cache outage is a miss: the model still answers
                log.warning("semantic cache lookup failed for %s", request.conversation_id)
                hit = None
            metrics.cache_lookup(request.tenant_id, hit is not None)
            if hit is not None:
                return Answer(
                    hit.answer,
                    "semantic-cache",
                    confidence,
                    decision.intent,
                    model=hit.model,
                    cache_hit=True,
                )
        intent = decision.intent
        if not self.config.models:
            return self._fallback(knowledge, text, lang, intent, confidence, "no-model")
        if not await self._allowed(request):
            return self._fallback(knowledge, text, lang, intent, confidence, "rate-limited")
        generated = await self._generate(request, lang, intent, knowledge)
        if generated is None:
            return self._fallback(knowledge, text, lang, intent, confidence, "unavailable")
        if self.cache is not None and cacheable:
            try:
                await self.cache.store(
                    request.tenant_id, decision.intent, lang, text, generated.text, generated.model
                )
            except Exception:  # a cache outage must not cost the customer the answer
                log.warning("semantic cache store failed for %s", request.conversation_id)
        return Answer(
            generated.text,
            "llm",
            confidence,
            decision.intent,
            model=generated.model,
            prompt_tokens=generated.prompt_tokens,
            completion_tokens=generated.completion_tokens,
            cost=generated.cost,
        )

    async def _allowed(self, request: ReplyRequested) -> bool:
        if self._limiter is None:
            return True
        try:
            return await self._limiter.allow(request.tenant_id)
        except Exception:  # the limiter's store is down: serve rather than refuse all
            log.warning("rate limiter unavailable for %s; allowing", request.tenant_id)
            return True

    def _read(self, request: ReplyRequested) -> _Read:
        text = request.text
        lang = request.language if request.language in ("en", "zh") else language_of(text)
        knowledge = self.library.get(request.tenant_id)
        vector = knowledge.classifier.vectorizer.vector(text)
        prediction = knowledge.classifier.predict_vector(vector)
        decision = decide(
            prediction,
            knowledge.specs,
            self.config.threshold_for(request.tenant_id),  # live: /admin's min_confidence
            self.config.clarify_floor,
        )
        confidence = decision.confidence
        immediate: Answer | None = None
        if decision.action == HANDOFF:
            immediate = Answer(HANDOFF_TEXT[lang], "intent", confidence, decision.intent, "handoff")
        elif decision.action == FAQ and decision.intent:
            faq = knowledge.answer_for(decision.intent, lang)
            if faq:
                immediate = Answer(faq, "intent-faq", confidence, decision.intent)
        elif decision.action == CLARIFY:
            question = clarifying_question(decision, knowledge.specs, lang)
            immediate = Answer(question, "intent", confidence, decision.intent, "clarify")
        return _Read(lang, knowledge, vector, decision, immediate)

    def _fallback(
        self,
        knowledge: TenantKnowledge,
        text: str,
        lang: str,
        intent: str | None,
        confidence: float,
        reason: str,
    ) -> Answer:
        """No model answer: the FAQ answer for the recognised intent if it has one,
        else the offline responder's answer when it agrees or nothing was recognised,
        else a person takes over (a wrong canned answer is worse than a handoff)."""
        if intent is not None and (faq := knowledge.answer_for(intent, lang)):
            return Answer(faq, f"intent-faq:{reason}", confidence, intent)
        offline = knowledge.offline.answer_text(text, lang)
        if offline.intent is not None and (intent is None or offline.intent == intent):
            return replace(offline, responder=f"{offline.responder}:{reason}")
        text_out = HANDOFF_TEXT[lang] if reason != "no-model" else FALLBACK[lang]
        return Answer(text_out, f"offline:{reason}", confidence, intent, "handoff")

    async def _generate(
        self,
        request: ReplyRequested,
        lang: str,
        intent: str | None,
        knowledge: TenantKnowledge,
    ) -> _Generated | None:
        tuning = self.config.tuning_for(request.tenant_id)
        streaming = (
            _Stream(self._sink, self._screen, request)
            if request.channel in self.config.stream_channels
            else _Stream(None, None, request)
        )
        deadline = self._clock() + self.config.first_token_budget
        for spec in select_models(self.config, request.tenant_id, lang, intent, request.text):
            breaker = self.breakers[spec.name]
            endpoint = self.endpoints[spec.name]
            for attempt in range(1, self.config.retries + 2):
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return None
                if not breaker.allow():
                    metrics.LLM_CALLS.labels(spec.name, "refused").inc()
                    break  # open: straight to the next model, no waiting
                try:
                    with metrics.llm_call(spec.name):
                        result = await self._call(
                            endpoint, request, lang, intent, knowledge, tuning, streaming, remaining
                        )
                except asyncio.CancelledError:
                    breaker.release()
                    raise
                except Exception as exc:
                    breaker.failure()
                    log.warning(
                        "model %s attempt %d failed for %s: %s (breaker %s)",
                        spec.name,
                        attempt,
                        request.conversation_id,
                        type(exc).__name__,
                        breaker.state,
                    )
                    await streaming.abandon()
                    if attempt <= self.config.retries:
                        pause = backoff(attempt, self.config.backoff)
                        await asyncio.sleep(min(pause, max(0.0, deadline - self._clock())))
                    continue
                breaker.success()
                return result
        return None

    async def _call(
        self,
        endpoint: ChatEndpoint,
        request: ReplyRequested,
        lang: str,
        intent: str | None,
        knowledge: TenantKnowledge,
        tuning: Tuning,
        on_text: OnText,
        first_token_timeout: float,
    ) -> _Generated:
        spec = endpoint.spec
        max_tokens = min(tuning.max_tokens, spec.max_output_tokens)
        context = knowledge.base.retrieve(
            request.text, self.config.retrieval_passages, spec.max_input_tokens // 4
        )
        system = self._system_prompt(request.tenant_id, lang, intent, context, tuning)
        budget = spec.max_input_tokens - estimate_tokens(system) - 16
        text = request.text
        prompt_tokens = completion_tokens = 0
        if estimate_tokens(text) > budget:
            text, prompt_tokens, completion_tokens = await self._condense(
                endpoint, text, lang, budget, tuning
            )
        messages = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        wait = min(first_token_timeout, spec.first_token_timeout)
        model = _model_id(self.config, tuning)
        done = await endpoint.stream(
            messages, tuning.temperature, max_tokens, on_text, wait, model=model
        )
        prompt_tokens += done.prompt_tokens
        completion_tokens += done.completion_tokens
        return _Generated(
            done.text,
            model or spec.name,
            prompt_tokens,
            completion_tokens,
            spec.cost(prompt_tokens, completion_tokens),
        )

    async def _condense(
        self, endpoint: ChatEndpoint, text: str, lang: str, budget: int, tuning: Tuning
    ) -> tuple[str, int, int]:
        """Map-reduce a message longer than the model takes: condense each part (in
        parallel), then the notes again if they are still too long."""
        prompt_tokens = completion_tokens = 0
        instruction = (
            "You read part {i} of {n} of one long customer message. List every question, "
            "request and concrete fact in it (order numbers, dates, amounts, names), "
            f"briefly, in {LANGUAGE_NAMES.get(lang, 'English')}. Do not answer it."
        )
        part_budget = max(64, budget - estimate_tokens(instruction) - 16)
        for _ in range(3):
            if estimate_tokens(text) <= budget:
                return text, prompt_tokens, completion_tokens
            parts = split_text(text, part_budget)
            notes = await asyncio.gather(
                *(
                    endpoint.complete(
                        [
                            {
                                "role": "system",
                                "content": instruction.format(i=i + 1, n=len(parts)),
                            },
                            {"role": "user", "content": part},
                        ],
                        0.0,
                        max(64, min(tuning.max_tokens, part_budget // max(1, len(parts)))),
                        model=_model_id(self.config, tuning),
                    )
                    for i, part in enumerate(parts)
                )
            )
            prompt_tokens += sum(n.prompt_tokens for n in notes)
            completion_tokens += sum(n.completion_tokens for n in notes)
            text = (
                f"(The customer's message was long; it came in {len(parts)} parts. "
                "Notes on each part follow.)\n"
                + "\n".join(f"Part {i + 1}: {n.text}" for i, n in enumerate(notes))
            )
        if estimate_tokens(text) > budget:
            raise ModelFailure("message too long even after condensing")
        return text, prompt_tokens, completion_tokens

    def _system_prompt(
        self,
        tenant_id: str,
        lang: str,
        intent: str | None,
        context: Sequence[str],
        tuning: Tuning,
    ) -> str:
        lines = [
            tuning.system_prompt
            or f"You are the customer-service assistant of {tenant_id}. Be brief, polite "
            "and concrete. Use the knowledge below when it is relevant; if it does not "
            "cover the question, say so and offer to bring in a human colleague. Never "
            "invent order data, prices or policies.",
            f"Answer in {LANGUAGE_NAMES.get(lang, 'English')}.",
        ]
        if intent:
            lines.append(f"The customer's request looks like: {intent.replace('_', ' ')}.")
        if context:
            lines.append("Knowledge:")
            lines += [f"- {passage}" for passage in context]
        return "\n".join(lines)
