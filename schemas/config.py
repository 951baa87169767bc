"""Configuration as events: the pure fold of the config topic (no I/O).

Every process (gateway, workers, SMTP listener) follows the compacted config topic and
folds its ``ConfigChanged`` records into one :class:`ConfigState`; readers ask it, so an
administrator's change is live everywhere within a fetch, with no restart. The record is
generic (kind, id, the entity's fields as JSON): what a kind's fields mean is checked
where they are written (the admin API's models) and read (its accessors below).

Kinds and their fields (all optional unless said):

- ``tenant`` ("-"): ``name``, ``disabled`` (bool), ``language`` ("zh" | "en"),
  ``ai_enabled`` (bool), ``retention_days`` (int; 0: no retention, see kefu/erasure.py).
- ``widget`` ("-"): ``color`` ("#RRGGBB"), ``greeting`` ({"zh": ..., "en": ...}),
  ``prechat`` (bool: ask name and email first), ``offline_message`` ({"zh", "en"}),
  ``team`` (the team web chats go to; "" the default), ``topics`` ([{"id", "label":
  {"zh", "en"}, "team"}]: the pre-chat form's topic field, each routing to a team).
- ``hours`` ("-"): ``timezone`` (IANA), ``days`` ({"mon": [["09:00", "18:00"]], ...});
  no entity: always open.
- ``team`` (team id): ``name``.
- ``agent`` (agent id): ``name``, ``email``, ``role`` ("agent" | "admin" | "operator"),
  ``teams`` ([team ids]), ``skills``, ``capacity`` (int), ``disabled`` (bool),
  ``avatar`` (URL or ""), ``password`` (argon2 hash: a secret, never shown back).
- ``canned`` (id): ``title``, ``text``, ``shortcut``.
- ``faq`` (id): ``question``, ``answer``, ``intent``, ``keywords`` ([str]).
- ``channel`` (``wechat`` | ``wechat_mp`` | ``telegram`` | ``email``): that channel's
  settings; secret fields encrypted. ``email``: ``addresses`` (inbound: mail to them is
  the tenant's; they replace the environment's), ``from_address`` (of replies).
- ``webhook`` ("-"): ``url``, ``secret`` (encrypted).
- ``ai`` ("-"): ``model`` (a configured model's label, tried first, or the model id to
  ask for), ``temperature``, ``system_prompt``, ``min_confidence`` (the intent
  threshold and the tenant FAQ's bar); read per answer by the workers (kefu/ai.py).

Secret fields hold ``{"enc": "<token>"}`` (``connectors``/``kefu`` encrypt with the
configured key); this module never sees a secret in clear.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from schemas.records import ConfigChanged

KINDS = ("tenant", "widget", "hours", "team", "agent", "canned", "faq", "channel", "webhook", "ai")
SINGLE = "-"  # the entity id of a kind a tenant has one of
SECRET_FIELDS = frozenset(
    {
        "password",
        "secret",
        "token",
        "app_secret",
        "encoding_aes_key",
        "bot_token",
        "secret_token",
        "api_key",
        "relay_password",
    }
)
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def config_key(tenant_id: str, kind: str, entity_id: str) -> bytes:
    return f"{tenant_id}/{kind}/{entity_id}".encode()


def is_secret(name: str) -> bool:
    return name in SECRET_FIELDS or name.endswith(("_secret", "_password", "_token"))


@dataclass(frozen=True, slots=True)
class Entity:
    kind: str
    entity_id: str
    data: Mapping[str, Any]
    version: int
    changed_at: int
    changed_by: str


@dataclass(slots=True)
class ConfigState:
    """Every tenant's configuration as the topic holds it now (mutable: the follower
    applies records to it in place; readers see a change at their next look)."""

    entities: dict[tuple[str, str, str], Entity] = field(default_factory=dict)
    _tombstones: dict[tuple[str, str, str], int] = field(default_factory=dict)
    applied: int = 0  # records applied (the follower's progress)
    applied_at: int = 0  # epoch ms of the last change

    # --- the fold --------------------------------------------------------------------

    def apply(self, record: ConfigChanged) -> bool:
        """Fold one record; False when it is older than what the key holds (a replayed
        or reordered record never undoes a newer change)."""
        key = (record.tenant_id, record.kind, record.entity_id)
        if record.version <= self.version(*key):
            return False
        if record.deleted:
            self.entities.pop(key, None)
            # Remembered, so an older "create" read later is ignored too.
            self._tombstones[key] = record.version
        else:
            data = json.loads(record.data) if record.data else {}
            if not isinstance(data, dict):
                raise ValueError("config data must be a JSON object")
            self.entities[key] = Entity(
                record.kind,
                record.entity_id,
                data,
                record.version,
                record.changed_at,
                record.changed_by,
            )
            self._tombstones.pop(key, None)
        self.applied += 1
        self.applied_at = max(self.applied_at, record.changed_at)
        return True

    def apply_all(self, records: Iterable[ConfigChanged]) -> int:
        return sum(self.apply(r) for r in records)

    # --- reading ---------------------------------------------------------------------

    def get(self, tenant: str, kind: str, entity_id: str = SINGLE) -> Mapping[str, Any] | None:
        found = self.entities.get((tenant, kind, entity_id))
        return found.data if found is not None else None

    def entity(self, tenant: str, kind: str, entity_id: str = SINGLE) -> Entity | None:
        return self.entities.get((tenant, kind, entity_id))

    def all(self, tenant: str, kind: str) -> dict[str, Mapping[str, Any]]:
        """The tenant's entities of ``kind`` by id, sorted by id."""
        found = {
            entity_id: e.data
            for (t, k, entity_id), e in self.entities.items()
            if t == tenant and k == kind
        }
        return dict(sorted(found.items()))

    def tenants(self) -> list[str]:
        """Tenants with a ``tenant`` entity (the operator's list)."""
        return sorted({t for (t, k, _) in self.entities if k == "tenant"})

    def version(self, tenant: str, kind: str, entity_id: str = SINGLE) -> int:
        found = self.entities.get((tenant, kind, entity_id))
        return (
            found.version
            if found is not None
            else self._tombstones.get((tenant, kind, entity_id), 0)
        )

    # --- typed accessors ---------------------------------------------------------------

    def agents(self, tenant: str) -> dict[str, Mapping[str, Any]]:
        return self.all(tenant, "agent")

    def canned(self, tenant: str) -> list[dict[str, Any]]:
        return [{"id": k, **v} for k, v in self.all(tenant, "canned").items()]

    def widget(self, tenant: str) -> dict[str, Any]:
        data = dict(self.get(tenant, "widget") or {})
        data.setdefault("color", "#1565c0")
        data.setdefault("greeting", {})
        data.setdefault("prechat", False)
        data.setdefault("offline_message", {})
        return data

    def open_now(self, tenant: str, now: dt.datetime | None = None) -> bool:
        """Within the tenant's business hours (always, when it has none)."""
        hours = self.get(tenant, "hours")
        return within_hours(hours, now) if hours else True


def within_hours(hours: Mapping[str, Any], now: dt.datetime | None = None) -> bool:
    try:
        zone = ZoneInfo(str(hours.get("timezone") or "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    local = (now or dt.datetime.now(dt.UTC)).astimezone(zone)
    spans = (hours.get("days") or {}).get(_DAYS[local.weekday()], [])
    clock = local.strftime("%H:%M")
    return any(start <= clock < end for start, end in spans)


def valid_hours(hours: Mapping[str, Any]) -> list[str]:
    """What is wrong with a ``hours`` entity (empty: nothing)."""
    errors = []
    try:
        ZoneInfo(str(hours.get("timezone") or "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        errors.append(f"unknown time zone {hours.get('timezone')!r}")
    for day, spans in (hours.get("days") or {}).items():
        if day not in _DAYS:
            errors.append(f"unknown day {day!r}")
            continue
        for span in spans:
            ok = (
                isinstance(span, list | tuple)
                and len(span) == 2
                and all(isinstance(t, str) and len(t) == 5 and t[2] == ":" for t in span)
            )
            if not ok or not span[0] < span[1]:
                errors.append(f"{day}: {span!r} is not [start, end] as HH:MM, start first")
    return errors


def faq_score(
    asked: AbstractSet[str],
    known: AbstractSet[str],
    question: str,
    keywords: Iterable[str],
    entry_question: str,
) -> float:
    """How well ``question`` (its terms: ``asked``) matches a ``faq`` entry (its terms:
    ``known``), as /admin's "try a question" and the workers' tenant FAQ both score it:
    the share of the asked terms the entry knows; when the question contains the
    entry's keywords, 0.6 for one and 0.2 more for each further one; the entry's own
    question, exactly, 1."""
    lowered = question.lower()
    score = len(asked & known) / len(asked) if asked else 0.0
    hits = sum(1 for k in keywords if k and k in lowered)
    if hits:
        score = max(score, min(1.0, 0.6 + 0.2 * (hits - 1)))
    if entry_question and entry_question.strip().lower() == lowered.strip():
        score = 1.0
    return score
