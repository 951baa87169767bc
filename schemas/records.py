"""The commands and events of kefu as frozen, typed records.

Each class mirrors ``avro/<ClassName>.avsc`` field for field (a test holds them
together). The envelope fields of DESIGN.md are on the base classes; ``type`` and
``schema_version`` are derived from the class and its schema, never set by hand.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from schemas.ids import uuid5_text

# Commands and events are addressed by conversation; ids are UUID strings.
_EVENT_NAMESPACE = uuid.UUID("6f1c2b1e-7d3a-4c55-9a61-2c0f3e9b8d17")


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """Anything kefu puts on a topic, encoded with the Avro codec."""

    SCHEMA_VERSION: ClassVar[int] = 1

    @property
    def type(self) -> str:
        return type(self).__name__

    @property
    def schema_version(self) -> int:
        return self.SCHEMA_VERSION

    def to_avro(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _field_names(type(self))}
        out["type"] = self.type
        out["schema_version"] = self.SCHEMA_VERSION
        return out

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Self:
        return cls(**{name: data[name] for name in _field_names(cls)})


_FIELDS: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type[Record]) -> tuple[str, ...]:
    # A plain dict: ``cls.__dict__`` builds a mapping proxy on every call (3 % of the
    # worker's CPU in a profile of the hot path).
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


ATTACHMENT_KINDS = ("image", "file", "audio", "video")


@dataclass(frozen=True, slots=True, kw_only=True)
class Attachment:
    """A file of a message (image, file, voice, video): metadata only. The bytes are in
    the blob store under ``storage_key`` (tenant-scoped, content-addressed), never in
    Kafka, so records stay small."""

    kind: str  # one of ATTACHMENT_KINDS
    mime_type: str  # sniffed from the bytes, never the declared type
    size: int
    name: str
    sha256: str
    storage_key: str
    width: int = 0
    height: int = 0
    duration_ms: int = 0
    thumbnail_key: str = ""

    def to_avro(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _ATTACHMENT_FIELDS}

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Attachment:
        return cls(**{f: data[f] for f in _ATTACHMENT_FIELDS})


_ATTACHMENT_FIELDS = tuple(f.name for f in dataclasses.fields(Attachment))


class _CarriesAttachments:
    """Messages and replies: ``attachments`` is a tuple of :class:`Attachment` in the
    record, a list of Avro records on the wire. (Explicit base calls: ``super()`` does
    not work in a slotted dataclass's methods.)"""

    __slots__ = ()

    def to_avro(self) -> dict[str, Any]:
        out = Record.to_avro(self)  # type: ignore[arg-type]
        out["attachments"] = [a.to_avro() for a in out["attachments"]]
        return out

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> Any:
        # ``data`` is the decoder's own dict: set in place (no copy per event).
        raw = data.get("attachments")
        data["attachments"] = tuple(Attachment.from_avro(a) for a in raw) if raw else ()
        return Record.from_avro.__func__(cls, data)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True, kw_only=True)
class Command(Record):
    command_id: str
    conversation_id: str
    tenant_id: str
    issued_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Event(Record):
    event_id: str
    conversation_id: str
    tenant_id: str
    seq: int
    occurred_at: int


def event_id_for(command_id: str, index: int, conversation_id: str = "") -> str:
    """The id of the ``index``-th event caused by a command: the same on every retry.

    Scoped by the conversation: command ids come from channel message ids, which two
    customers may share (a REST client's "m1"), and a reply's event id is the
    idempotency key its channel dedupes on, tenant-wide."""
    scope = f"{conversation_id}/" if conversation_id else ""
    return uuid5_text(_EVENT_NAMESPACE, f"{scope}{command_id}/{index}")


# --- commands --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiveMessage(_CarriesAttachments, Command):
    SCHEMA_VERSION: ClassVar[int] = 3
    channel: str
    customer_id: str
    text: str  # may be "" when the message is attachments only (version 2)
    channel_message_id: str
    language: str | None = None
    attachments: tuple[Attachment, ...] = ()
    # The team a conversation this message starts goes to (version 3): the web chat's
    # team or its pre-chat topic's; "" is the tenant's default team.
    team: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordReply(_CarriesAttachments, Command):
    SCHEMA_VERSION: ClassVar[int] = 4
    in_reply_to: str
    text: str
    author: str
    responder: str
    confidence: float
    intent: str | None = None
    action: str = "answer"  # answer | clarify | handoff
    # Accounting (version 3): which model, whether the semantic cache answered, cost.
    model: str = ""
    cache_hit: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_ms: int = 0
    attachments: tuple[Attachment, ...] = ()  # version 4: an agent's images and files


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordDelivery(Command):
    reply_event_id: str
    channel: str
    status: str
    attempts: int
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class EraseCustomer(Command):
    """A customer's data keys were deleted: record it in this conversation (the read
    models redact on the ``CustomerErased`` that follows). ``kefu/erasure.py``."""

    customer_id: str
    requested_by: str
    reason: str  # request | retention
    key_ids: list[str] = dataclasses.field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseConversation(Command):
    reason: str
    closed_by: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AddNote(Command):
    """An agent's internal note: for the team only, never sent to the customer."""

    author: str
    text: str


# --- events ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageReceived(_CarriesAttachments, Event):
    SCHEMA_VERSION: ClassVar[int] = 3
    channel: str
    customer_id: str
    text: str
    channel_message_id: str
    command_id: str
    language: str | None = None
    attachments: tuple[Attachment, ...] = ()  # version 3


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageModerated(_CarriesAttachments, Event):
    SCHEMA_VERSION: ClassVar[int] = 2
    message_event_id: str
    direction: str
    verdict: str
    text: str
    categories: list[str] = dataclasses.field(default_factory=list)
    list_version: int = 0
    # Version 2: what of the message's attachments may be shown (none when blocked), so
    # the read models list a message from this one event.
    attachments: tuple[Attachment, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationRouted(Event):
    assignee: str
    queue: str
    reason: str
    priority: str = "normal"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyRequested(Event):
    SCHEMA_VERSION: ClassVar[int] = 2
    message_event_id: str
    channel: str
    text: str
    language: str | None = None
    # Version 2: answered by the conversation agent itself; the responder skips it.
    answered_inline: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplyProduced(_CarriesAttachments, Event):
    SCHEMA_VERSION: ClassVar[int] = 3
    in_reply_to: str
    channel: str
    text: str
    author: str
    responder: str
    confidence: float
    customer_id: str
    intent: str | None = None
    # Version 2: copied from RecordReply (action, model, cache hit, tokens, cost).
    action: str = "answer"
    model: str = ""
    cache_hit: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_ms: int = 0
    attachments: tuple[Attachment, ...] = ()  # version 3


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageDelivered(Event):
    reply_event_id: str
    channel: str
    status: str
    attempts: int
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class NoteAdded(Event):
    """An internal note on the log (audited, replayed), which no channel delivers:
    delivery reads ``ReplyProduced`` only, and customers' views drop ``note`` entries."""

    author: str
    text: str
    command_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomerErased(Event):
    """The customer's data keys are deleted: every sealed field of this conversation's
    events reads as erased from now on (``schemas/sealing.py``), and the read models
    redact what they hold. Who asked and when; no personal data."""

    customer_id: str
    requested_by: str
    reason: str
    command_id: str
    key_ids: list[str] = dataclasses.field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationClosed(Event):
    SCHEMA_VERSION: ClassVar[int] = 2
    reason: str
    closed_by: str
    assignee: str = ""
    queue: str = ""


# --- operations ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter(Record):
    source_topic: str
    partition: int
    offset: int
    reason: str
    consumer: str
    failed_at: int
    payload: bytes
    key: bytes | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WordListChanged(Record):
    """A moderation category's whole list for a tenant ('*': all), on the compacted
    control topic keyed ``<tenant_id>/<category>``."""

    tenant_id: str
    category: str
    action: str
    words: list[str]
    version: int
    changed_at: int
    changed_by: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigChanged(Record):
    """A tenant's configuration entity as it is now (``schemas/config.py`` folds them),
    on the compacted config topic keyed ``<tenant_id>/<kind>/<entity_id>``."""

    tenant_id: str
    kind: str
    entity_id: str
    data: str  # JSON of the entity's fields; secrets encrypted
    version: int
    changed_at: int
    changed_by: str
    deleted: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditCheckpoint(Record):
    """A conversation's keyed chain head at ``seq``, signed with the tenant's audit key
    (``projections/audit_keyed.py``), on the checkpoints topic keyed by conversation."""

    tenant_id: str
    conversation_id: str
    seq: int
    head: str
    checkpointed_at: int
    signature: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DataKey(Record):
    """A customer's data key, wrapped with the master key, on the compacted keys topic
    keyed by ``key_id`` (``connectors/keystore.py``); a tombstone erases it."""

    tenant_id: str
    customer_id: str
    key_id: str
    wrapped: bytes
    created_at: int
    created_by: str = ""


# --- routing: conversation commands and events -----------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AssignConversation(Command):
    agent_id: str
    queue: str
    priority: str


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConversation(Command):
    queue: str
    priority: str
    position: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HandOff(Command):
    SCHEMA_VERSION: ClassVar[int] = 2
    to: str  # human | ai
    reason: str
    requested_by: str
    team: str = ""
    agent: str = ""  # transfer to this agent when they can take it


@dataclass(frozen=True, slots=True, kw_only=True)
class RateConversation(Command):
    rating: int
    comment: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class FlagSlaBreach(Command):
    kind: str  # first | next
    due_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationQueued(Event):
    queue: str
    priority: str
    position: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationAssigned(Event):
    assignee: str
    queue: str
    priority: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationHandedOff(Event):
    SCHEMA_VERSION: ClassVar[int] = 2
    from_assignee: str
    to_assignee: str
    queue: str
    reason: str
    requested_by: str
    from_queue: str = ""
    priority: str = "normal"
    preferred_agent: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SlaBreached(Event):
    kind: str
    due_at: int
    assignee: str
    priority: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CsatRequested(Event):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class CsatRated(Event):
    rating: int
    comment: str = ""
    assignee: str = ""


# --- routing: queue commands and events (keyed by queue = tenant:team) -----------


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingCommand(Record):
    command_id: str
    tenant_id: str
    queue: str
    issued_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueEvent(Record):
    event_id: str
    tenant_id: str
    queue: str
    seq: int
    occurred_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SetAgentPresence(RoutingCommand):
    agent_id: str
    presence: str  # online | away | offline
    capacity: int
    skills: list[str] = dataclasses.field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestAssignment(RoutingCommand):
    SCHEMA_VERSION: ClassVar[int] = 2
    conversation_id: str
    priority: str
    requested_at: int
    skill: str = ""
    preferred_agent: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseAssignment(RoutingCommand):
    conversation_id: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentPresenceChanged(QueueEvent):
    agent_id: str
    presence: str
    capacity: int
    skills: list[str] = dataclasses.field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationEnqueued(QueueEvent):
    SCHEMA_VERSION: ClassVar[int] = 2
    conversation_id: str
    priority: str
    order: int
    skill: str = ""
    preferred_agent: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentAssigned(QueueEvent):
    conversation_id: str
    agent_id: str
    priority: str
    order: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AssignmentReleased(QueueEvent):
    conversation_id: str
    agent_id: str
    reason: str


def projected_ms(type_name: str, occurred_at: int, appended_at: int | None) -> int:
    """When an event takes effect in the read models. An event's time derives from its
    command (so a decision made again after a crash has the same bytes), which for an
    answer given in the same step as the customer's message (``Policy.answer_now``) is
    the message's own time. A reply is therefore taken at the time its record reached
    the log (the record's timestamp, stamped by the producer that appended it), so
    first-response times are real; every other event at its own time."""
    if type_name == "ReplyProduced" and appended_at is not None and appended_at > occurred_at:
        return appended_at
    return occurred_at


def as_projected(event: Any, appended_at: int | None) -> Any:
    """``event`` with the time the read models take it at (``projected_ms``)."""
    at = projected_ms(type(event).__name__, event.occurred_at, appended_at)
    return event if at == event.occurred_at else dataclasses.replace(event, occurred_at=at)


# --- commits: the events of one decision as one Kafka record ----------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Commit(Record):
    """The events one decision appends, as ONE Kafka record: a decision is atomic on
    the log and costs one produce and one fetch. Each event keeps its own Avro bytes
    (id, seq, the bytes the audit chain hashes); ``schemas.codec`` packs and unpacks.
    Records written before commits existed hold one event each and read the same."""

    tenant_id: str
    key: str  # the Kafka key: a conversation id, or a queue for queue events
    events: list[bytes]


COMMAND_TYPES: tuple[type[Command], ...] = (
    ReceiveMessage,
    RecordReply,
    RecordDelivery,
    CloseConversation,
    AssignConversation,
    QueueConversation,
    HandOff,
    RateConversation,
    FlagSlaBreach,
    AddNote,
    EraseCustomer,
)
EVENT_TYPES: tuple[type[Event], ...] = (
    MessageReceived,
    MessageModerated,
    ConversationRouted,
    ReplyRequested,
    ReplyProduced,
    MessageDelivered,
    ConversationClosed,
    ConversationQueued,
    ConversationAssigned,
    ConversationHandedOff,
    SlaBreached,
    CsatRequested,
    CsatRated,
    NoteAdded,
    CustomerErased,
)
ROUTING_COMMAND_TYPES: tuple[type[RoutingCommand], ...] = (
    SetAgentPresence,
    RequestAssignment,
    ReleaseAssignment,
)
QUEUE_EVENT_TYPES: tuple[type[QueueEvent], ...] = (
    AgentPresenceChanged,
    ConversationEnqueued,
    AgentAssigned,
    AssignmentReleased,
)
RECORD_TYPES: dict[str, type[Record]] = {
    cls.__name__: cls
    for cls in (
        *COMMAND_TYPES,
        *EVENT_TYPES,
        *ROUTING_COMMAND_TYPES,
        *QUEUE_EVENT_TYPES,
        DeadLetter,
        WordListChanged,
        ConfigChanged,
        AuditCheckpoint,
        DataKey,
        Commit,
    )
}


def dead_letter(
    *,
    source_topic: str,
    partition: int,
    offset: int,
    reason: str,
    consumer: str,
    failed_at: int,
    payload: bytes,
    key: bytes | None,
) -> DeadLetter:
    """A dead letter keeps the bytes as they were, so the record can be replayed."""
    return DeadLetter(
        source_topic=source_topic,
        partition=partition,
        offset=offset,
        reason=reason[:1000],
        consumer=consumer,
        failed_at=failed_at,
        payload=payload,
        key=key,
    )
