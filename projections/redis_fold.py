"""The Redis read model rebuilt per conversation, not per event (replays).

The live projection (``projections.redis_state``) runs its guarded script once per
event: an HMGET, an HSET and the index writes, ~20 µs of Redis's single thread each,
which capped a replay near 30,000 events/s. A replay holds a batch of events up front,
so here each conversation's events of the batch are folded in Python into what that
script would leave, step by step with its own rules (the seq guard, ``Change`` sets
and counters, ``created_at`` and ``first_response_ms``, the capped recent-messages
list, the status / waiting-queue / assignee / unread / recent-activity indexes), and
the result is written with one script call per ``CONVERSATIONS_PER_CALL``
conversations: per conversation one HSET of the fields that changed, one RPUSH (and
LTRIM past the cap), and the last ZADD or ZREM of each sorted set it touched.

The fold starts from what the conversation's hash holds, so a write is right only if
the hash still holds it; the script checks that for each conversation (no hash, or the
same ``seq``) and writes nothing where it does not. Those conversations come back:
their hashes are read (HGETALL), their events folded again on top, and written under
the same check; one that changed once more (a live writer raced the replay) goes
through the live script event by event. In a replay into an emptied model nearly every
conversation is absent (one round trip); one whose events straddle two batches takes
the second round. So the contents equal the live projection's, key by key (HGETALL,
LRANGE, ZRANGE: ``tests/test_replay.py``); hashes may be laid out differently inside
Redis (field order, encoding), which no reader sees.

Not folded (they go through the live script, in log order): queues' events (their
own seq and the agents hash) and any conversation whose events write other keys
(``Change.ext``; no conversation event does today).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

from projections.redis_state import (
    HANDLERS,
    NOTHING,
    RECENT_MESSAGES,
    RedisConversations,
    _arg,
    _message_json,
    index_specs,
)
from schemas.keys import conversation_key, conversations_key, messages_key, unread_key
from schemas.records import Event, QueueEvent, projected_ms

# Conversations per script call: a call blocks Redis's other clients until it ends
# (~2-3 ms at this size).
CONVERSATIONS_PER_CALL = 100

# ARGV[1]: a JSON array, per conversation: [hash key, expected seq (false: no hash),
# messages key, list cap, member, [field, value, ...], [message JSON, ...],
# [sorted set, score or "" to remove, ...]]. Writes those whose hash is as expected;
# returns the (1-based) positions of the others.
_WRITE_FOLDED = """
local conflicts = {}
for i, c in ipairs(cjson.decode(ARGV[1])) do
  local h, expect = c[1], c[2]
  local ok
  if expect == false then
    ok = redis.call('EXISTS', h) == 0
  else
    ok = (redis.call('HGET', h, 'seq') or '') == expect
  end
  if ok then
    local fields, messages, zsets, member = c[6], c[7], c[8], c[5]
    if #fields > 0 then redis.call('HSET', h, unpack(fields)) end
    if #messages > 0 and redis.call('RPUSH', c[3], unpack(messages)) > c[4] then
      redis.call('LTRIM', c[3], -c[4], -1)
    end
    for j = 1, #zsets, 2 do
      if zsets[j + 1] == '' then
        redis.call('ZREM', zsets[j], member)
      else
        redis.call('ZADD', zsets[j], zsets[j + 1], member)
      end
    end
  else
    conflicts[#conflicts + 1] = i
  end
end
return conflicts
"""


class NotFoldable(Exception):
    """An event whose effects this fold does not model (writes to other keys)."""


@functools.lru_cache(maxsize=4096)
def _tenant(tenant: str) -> tuple[str, str, tuple[tuple[str, str, str], ...], tuple[str, ...]]:
    """A tenant's conversations and unread keys, its index specs, and the hash fields
    they read (each index's field, then its score field)."""
    specs = tuple((f, prefix, score) for f, prefix, score in index_specs(tenant))
    watched = tuple(name for f, _, score in specs for name in (f, score))
    return conversations_key(tenant), unread_key(tenant), specs, watched


def _number(value: str | None) -> float | None:
    """Lua's ``tonumber`` of a hash value, for the values this model stores."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None


def _int_text(number: float) -> str:
    """``string.format('%d', number)``: truncated toward zero."""
    return str(int(number))


def _score_text(number: float) -> str:
    """A Lua number as Redis takes it for a score (``%.17g``)."""
    return str(int(number)) if float(number).is_integer() else repr(float(number))


@dataclass(slots=True)
class Fold:
    """One conversation's state while its events are folded: the hash as it would be
    (``cur``) and the writes that get Redis there from ``initial``."""

    tenant: str
    conversation: str
    initial: dict[str, str]  # the hash as stored (empty: none)
    exists: bool
    cur: dict[str, str] = field(init=False)
    seq: float = field(init=False)
    messages: list[str] = field(default_factory=list)
    zsets: dict[str, str] = field(default_factory=dict)  # last score, "" = removed
    applied: int = 0
    _keys: tuple[str, str, tuple[tuple[str, str, str], ...], tuple[str, ...]] = field(init=False)

    def __post_init__(self) -> None:
        self.cur = dict(self.initial)
        self.seq = _number(self.initial.get("seq")) or 0
        self._keys = _tenant(self.tenant)

    def step(self, event: Any) -> None:
        """Apply one event as ``_APPLY_EVENT`` does (``event``: an ``Event`` or any
        object with its fields as attributes)."""
        seq = event.seq
        if seq <= self.seq:
            return  # the guard: redelivered or already applied
        handler = HANDLERS.get(event.type)
        change = handler(event) if handler else NOTHING
        if change.ext:
            raise NotFoldable(f"{event.type} writes other keys")
        conversations, unread, specs, watched = self._keys
        cur = self.cur
        get = cur.get
        old = [get(name, "") for name in watched]  # each index's field and score field
        old_unread = get("unread")
        old_updated = get("updated_at")
        at = str(event.occurred_at)
        self.seq = seq
        self.applied += 1
        cur["seq"] = str(seq)
        cur["updated_at"] = at
        cur["conversation_id"] = self.conversation
        if "created_at" not in cur:
            cur["created_at"] = at
        for name, value in change.set.items():
            cur[name] = value if type(value) is str else _arg(value)
        for name in change.incr:
            cur[name] = _int_text((_number(get(name)) or 0) + 1)
            if name == "replies" and "first_response_ms" not in cur:
                created = _number(cur["created_at"]) or 0
                cur["first_response_ms"] = _int_text((_number(at) or 0) - created)
        zsets = self.zsets
        i = 0
        for f, prefix, sf in specs:
            was = old[i]
            new = get(f, "")
            if was and was != new:
                zsets[prefix + was] = ""
            if new:
                score = get(sf, "")
                if not (was == new and score and score == old[i + 1]):
                    zsets[prefix + new] = score or at
            i += 2
        now_unread = get("unread")
        if now_unread != old_unread:
            before, after = _number(old_unread or "0"), _number(now_unread or "0")
            if after != before:
                assert after is not None, "unread is a count"
                zsets[unread] = _score_text(after) if after > 0 else ""
        if change.message:
            messages = self.messages
            messages.append(_message_json(change.message))
            if len(messages) > RECENT_MESSAGES:
                del messages[0]
        if old_updated != at:
            zsets[conversations] = at

    def entry(self) -> list[Any]:
        """This fold's writes, as one conversation of ``_WRITE_FOLDED``'s payload."""
        initial = self.initial
        pairs: list[str] = []
        for name, value in self.cur.items():
            if initial.get(name) != value:
                pairs.append(name)
                pairs.append(value)
        flat: list[str] = []
        for key, score in self.zsets.items():
            flat.append(key)
            flat.append(score)
        return [
            conversation_key(self.tenant, self.conversation),
            initial.get("seq", "") if self.exists else False,
            messages_key(self.tenant, self.conversation),
            RECENT_MESSAGES,
            self.conversation,
            pairs,
            self.messages,
            flat,
        ]


def view(
    kind: type[Event] | type[QueueEvent], fields: Mapping[str, Any], appended_at: int | None = None
) -> Any:
    """An event's decoded fields as attributes, without building the frozen record
    (the handlers read fields by name): a third of the cost. Its time is the one the
    read models take it at (``schemas.records.projected_ms``: a reply's is when its
    record reached the log), as the live projection does."""
    event = SimpleNamespace(**fields)
    event.type = kind.__name__
    event.occurred_at = projected_ms(event.type, event.occurred_at, appended_at)
    return event


def fold(
    tenant: str,
    conversation: str,
    events: Sequence[Any],
    stored: Mapping[str, str] | None = None,
) -> Fold:
    """The fold of one conversation's ``events`` (in log order) on top of its hash as
    ``stored`` (None: no hash). Raises :class:`NotFoldable`."""
    folded = Fold(tenant, conversation, dict(stored or {}), stored is not None)
    for event in events:
        folded.step(event)
    return folded


class Item(Protocol):
    """An event to write: its class, its decoded fields and, for the per-event path,
    the record (``projections.replay.LogRecord``)."""

    @property
    def kind(self) -> type[Event] | type[QueueEvent]: ...

    @property
    def fields(self) -> dict[str, Any]: ...

    @property
    def appended_at(self) -> int | None:
        """Its Kafka record's timestamp (None: unknown)."""
        ...

    @property
    def event(self) -> Event | QueueEvent: ...


Key = tuple[str, str]  # tenant, conversation


@dataclass(slots=True)
class _Write:
    """One batch's write; once done, the conversations it did not leave as it folded
    them (their hash was not as expected, or they went event by event)."""

    lost: set[Key] = field(default_factory=set)


@dataclass(slots=True)
class _Known:
    """A conversation's hash as this writer last folded it, and the write that put (or
    puts) it there: true once that write is done, unless the write lost it."""

    hash: dict[str, str]
    write: _Write


@dataclass(slots=True)
class _Group:
    tenant: str
    conversation: str
    items: list[Item]
    views: list[Any] = field(default_factory=list)
    base: _Write | None = None  # the write whose state the fold started from


@dataclass(slots=True)
class Prepared:
    """A batch, folded: the groups written by fold entries (``groups[i]`` made
    ``entries[i]``), the events for the live script (in log order), and its write."""

    groups: list[_Group]
    entries: list[list[Any]]
    per_event: list[Event | QueueEvent]
    write: _Write


# Conversations whose last folded hash a writer keeps: a conversation's events are
# spread over many batches in a log of interleaved conversations, and each batch folds
# on top of the hash the one before left instead of reading it back (~3 KB each).
KNOWN_CONVERSATIONS = 50_000


class FoldingWriter:
    """Writes batches of events into the Redis model per conversation (see the module
    docstring); the per-event path is ``RedisConversations``'s.

    A batch is folded (:meth:`prepare`) while the one before is written (:meth:`write`),
    on top of the hashes that batch's folds will leave if its writes go as expected; the
    script checks, and a fold whose base went otherwise is done again when its write
    comes, so writes must run one at a time, in the order the batches were prepared."""

    def __init__(
        self,
        client: aioredis.Redis,
        model: RedisConversations | None = None,
        conversations_per_call: int = CONVERSATIONS_PER_CALL,
        known_conversations: int = KNOWN_CONVERSATIONS,
    ) -> None:
        self._redis = client
        self._model = model or RedisConversations(client)
        self._write = client.register_script(_WRITE_FOLDED)
        self._per_call = conversations_per_call
        self._known: dict[Key, _Known] = {}  # least recently written first
        self._known_max = known_conversations
        # Conversations written by a fold, by a fold on a hash read back (it was not as
        # expected), and events through the live script: tests and the bench's account.
        self.counts = {"folded": 0, "refolded": 0, "per_event": 0}

    def prepare(self, items: Sequence[Item]) -> Prepared:
        """CPU only: each conversation's events folded on top of its hash as this
        writer last folded it (none if it does not know it)."""
        groups: dict[Key, _Group] = {}
        singles = False
        for item in items:
            if issubclass(item.kind, Event):
                fields = item.fields
                key = (fields["tenant_id"], fields["conversation_id"])
                group = groups.get(key)
                if group is None:
                    groups[key] = group = _Group(key[0], key[1], [])
                group.items.append(item)
            else:
                singles = True  # a queue's event
        write = _Write()
        folded: list[_Group] = []
        entries: list[list[Any]] = []
        unfoldable: set[int] = set()
        for key, group in groups.items():
            group.views = [view(item.kind, item.fields, item.appended_at) for item in group.items]
            known = self._known.get(key)
            try:
                result = fold(
                    group.tenant, group.conversation, group.views, known.hash if known else None
                )
            except NotFoldable:
                unfoldable.update(id(item) for item in group.items)
                self._known.pop(key, None)
                continue
            if result.applied:
                group.base = known.write if known else None
                folded.append(group)
                entries.append(result.entry())
                self._remember(key, result.cur, write)
        per_event: list[Event | QueueEvent] = []
        if singles or unfoldable:
            per_event = [
                item.event
                for item in items
                if id(item) in unfoldable or not issubclass(item.kind, Event)
            ]
        return Prepared(folded, entries, per_event, write)

    def _remember(self, key: Key, hash_: dict[str, str], write: _Write) -> None:
        known = self._known
        known.pop(key, None)
        known[key] = _Known(hash_, write)
        if len(known) > self._known_max:
            del known[next(iter(known))]

    def _forget(self, key: Key, write: _Write) -> None:
        """``write`` did not leave ``key`` as folded: its hash is not known (unless a
        later batch's fold took over, which its own write checks)."""
        write.lost.add(key)
        known = self._known.get(key)
        if known is not None and known.write is write:
            del self._known[key]

    async def write(self, prepared: Prepared) -> None:
        """What :meth:`prepare` made, into Redis; conversations whose hash was not as
        the fold expected are folded again on top of it, read back."""
        write = prepared.write
        valid: list[int] = []
        redo: list[_Group] = []
        for i, group in enumerate(prepared.groups):
            base = group.base
            if base is not None and (group.tenant, group.conversation) in base.lost:
                redo.append(group)  # folded on a hash its write did not leave
            else:
                valid.append(i)
        conflicts = await self._send([prepared.entries[i] for i in valid])
        self.counts["folded"] += len(valid) - len(conflicts)
        redo += [prepared.groups[valid[i]] for i in conflicts]
        if redo:
            for group in redo:
                self._forget((group.tenant, group.conversation), write)
            await self._refold(redo, write)
        if prepared.per_event:
            self.counts["per_event"] += len(prepared.per_event)
            await self._model.apply_payloads(self._model.payloads(prepared.per_event))

    async def apply(self, items: Sequence[Item]) -> None:
        await self.write(self.prepare(items))

    async def _send(self, entries: Sequence[list[Any]]) -> list[int]:
        """The entries, in one round trip; the indexes of those whose hash was not as
        expected (nothing of them written)."""
        if not entries:
            return []
        starts = list(range(0, len(entries), self._per_call))
        async with self._redis.pipeline(transaction=False) as pipe:
            for start in starts:
                chunk = orjson.dumps(entries[start : start + self._per_call])
                await self._write(keys=[], args=[chunk], client=pipe)
            results = await pipe.execute()
        return [
            start + int(position) - 1
            for start, result in zip(starts, results, strict=True)
            for position in result
        ]

    async def _refold(self, groups: Sequence[_Group], write: _Write) -> None:
        """Conversations whose hash was not as expected: folded on top of it (read
        now), written if it is still the same, else event by event."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for group in groups:
                pipe.hgetall(conversation_key(group.tenant, group.conversation))
            hashes = await pipe.execute()
        again: list[_Group] = []
        entries: list[list[Any]] = []
        results: list[Fold] = []
        per_event: list[Event | QueueEvent] = []
        for group, raw in zip(groups, hashes, strict=True):
            try:
                stored = {_text(k): _text(v) for k, v in raw.items()}
                result = fold(group.tenant, group.conversation, group.views, stored or None)
            except (NotFoldable, UnicodeDecodeError):
                per_event.extend(item.event for item in group.items)
                continue
            if result.applied:
                again.append(group)
                entries.append(result.entry())
                results.append(result)
        conflicts = set(await self._send(entries))
        self.counts["refolded"] += len(entries) - len(conflicts)
        settled = _Write()
        for i, (group, result) in enumerate(zip(again, results, strict=True)):
            key = (group.tenant, group.conversation)
            if i in conflicts:
                # Changed again since the read (a live writer): event by event.
                per_event += [item.event for item in group.items]
            elif key not in self._known:  # no later batch folded on it meanwhile
                self._remember(key, result.cur, settled)
        if per_event:
            self.counts["per_event"] += len(per_event)
            await self._model.apply_payloads(self._model.payloads(per_event))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
