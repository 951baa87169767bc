"""Wiring of the AI responder: settings into ``streams.llm.AIConfig``, Redis for the
semantic cache, the rate limit and streamed tokens. With no model configured the
offline FAQ responder answers, as before."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import redis.asyncio as aioredis

from connectors.ai_store import RedisCacheStore, RedisRateLimiter, RedisTokenSink
from kefu.settings import AISettings, Settings
from schemas.config import ConfigState
from streams.llm import AIConfig, AIResponder, KnowledgeLibrary, ModelSpec, Rule, Screen, Tuning
from streams.moderation import Moderates, Moderator
from streams.responders import OfflineResponder, Responder
from streams.semantic_cache import SemanticCache


class LiveTuning(Mapping[str, Tuning]):
    """Each tenant's temperature, output limit, system prompt, model and intent
    threshold (``min_confidence``): the environment's, with what /admin set (config
    kind ``ai``) on top, read per request, so a change applies to the next answer
    without a restart."""

    def __init__(self, seed: Mapping[str, Tuning], config: ConfigState, default: Tuning) -> None:
        self._seed = seed
        self._config = config
        self._default = default

    def __getitem__(self, tenant: str) -> Tuning:
        base = self._seed.get(tenant)
        live = self._config.get(tenant, "ai")
        if live is None:
            if base is None:
                raise KeyError(tenant)
            return base
        base = base or self._default
        threshold = live.get("min_confidence", base.min_confidence)
        return Tuning(
            float(live.get("temperature", base.temperature)),
            int(live.get("max_tokens", base.max_tokens)),
            str(live.get("system_prompt", base.system_prompt) or ""),
            str(live.get("model") or base.model),
            float(threshold) if threshold is not None else None,
        )

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._seed) | set(self._config.tenants())))

    def __len__(self) -> int:
        return len(set(self._seed) | set(self._config.tenants()))


def ai_config(ai: AISettings, live: ConfigState | None = None) -> AIConfig:
    return AIConfig(
        models=tuple(
            ModelSpec(
                name=label,
                model=m.model or label,
                base_url=m.base_url,
                api_key=m.api_key.get_secret_value(),
                languages=tuple(m.languages),
                cost_in=m.cost_in_per_1k,
                cost_out=m.cost_out_per_1k,
                max_input_tokens=m.max_input_tokens,
                max_output_tokens=m.max_output_tokens,
                timeout=m.timeout,
                first_token_timeout=m.first_token_timeout,
            )
            for label, m in ai.models.items()
        ),
        rules=tuple(
            Rule(r.model, r.tenant, r.language, r.intent, r.pattern) for r in ai.rules.values()
        ),
        tuning=Tuning(ai.temperature, ai.max_tokens),
        tenants=_tenants(ai, live),
        intent_threshold=ai.intent_threshold,
        clarify_floor=ai.clarify_floor,
        retries=ai.retries,
        backoff=ai.backoff_seconds,
        first_token_budget=ai.first_token_budget_seconds,
        breaker_failures=ai.breaker_failures,
        breaker_reset=ai.breaker_reset_seconds,
        stream_channels=tuple(ai.stream_channels),
    )


def _tenants(ai: AISettings, live: ConfigState | None) -> Mapping[str, Tuning]:
    seed = {
        tenant: Tuning(t.temperature, t.max_tokens, t.system_prompt)
        for tenant, t in ai.tenants.items()
    }
    if live is None:
        return seed
    return LiveTuning(seed, live, Tuning(ai.temperature, ai.max_tokens))


def moderation_screen(moderator: Moderates) -> Screen:
    """Streamed text passes the same outbound moderation as the final reply."""

    def screen(tenant_id: str, text: str) -> str | None:
        verdict = moderator.check(text, tenant_id)
        return None if verdict.action == "block" else verdict.text

    return screen


def build_responder(
    settings: Settings,
    redis: aioredis.Redis,
    moderator: Moderates | None = None,
    live: ConfigState | None = None,
) -> Responder:
    ai = settings.ai
    if not ai.models:
        return OfflineResponder()
    overrides = {
        tenant: (
            t.rate_per_second if t.rate_per_second is not None else ai.rate_per_second,
            t.rate_burst if t.rate_burst is not None else ai.rate_burst,
        )
        for tenant, t in ai.tenants.items()
    }
    cache = (
        SemanticCache(
            RedisCacheStore(redis), ttl=ai.cache_ttl_seconds, similarity=ai.cache_similarity
        )
        if ai.cache_enabled
        else None
    )
    return AIResponder(
        ai_config(ai, live),
        library=KnowledgeLibrary(ai.knowledge_dir),
        cache=cache,
        limiter=RedisRateLimiter(redis, ai.rate_per_second, ai.rate_burst, overrides),
        sink=RedisTokenSink(redis),
        screen=moderation_screen(moderator or Moderator()),
    )
