"""Crypto-shredding: customers' personal fields sealed with their own data key (no I/O).

What is personal in an event (``SEALED``: message and reply text, notes, CSAT comments,
attachments' file names) is written to the log as a sealed string::

    kefu-sealed:v1:<key id>:<base64url(nonce + AES-GCM ciphertext and tag)>

under the data key of the conversation's customer (``connectors/keystore.py`` keeps
the keys, wrapped with the master key, on a compacted topic). Deleting a customer's
keys (``kefu privacy erase``) makes every sealed field of their events read as
:data:`ERASED`, in every reader and in every replay, while the event stays on the log
with the exact bytes the audit chain hashed.

- The associated data binds a value to its tenant, customer, event id and field, so a
  sealed value copied into another event (or another tenant's) does not open.
- The nonce is synthetic: HMAC-SHA256 under a key derived from the data key, over the
  associated data and the plaintext, cut to 96 bits. A decision made again (after a
  crash; event ids derive from the command) gives byte-identical events, and two
  different plaintexts never share a nonce under one key (they would need an HMAC
  collision), which AES-GCM requires.
- Readers never call this module per field: :func:`install` puts an opener per sealed
  record type into the codec (``schemas/codec.py``), so every decode of a sealed
  event, in any process that installed it, gives clear text while the key exists and
  :data:`ERASED` after. A process that installed none sees the sealed strings.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas.codec import CODEC, AvroCodec, DecodeError
from schemas.records import RECORD_TYPES, Event, _field_names

PREFIX = "kefu-sealed:v1:"
ERASED = "[erased]"  # what every sealed field of an erased customer reads as
KEY_BYTES = 32
KEY_ID_CHARS = 16  # hex

# The personal fields of each event type (attachments' names besides, where listed).
SEALED: dict[str, tuple[str, ...]] = {
    "MessageReceived": ("text",),
    "MessageModerated": ("text",),
    "ReplyRequested": ("text",),
    "ReplyProduced": ("text",),
    "NoteAdded": ("text",),
    "CsatRated": ("comment",),
}
WITH_ATTACHMENTS = frozenset({"MessageReceived", "MessageModerated", "ReplyProduced"})
_SEP = b"\x1f"


class SealError(ValueError):
    """A sealed value that does not open under its key (tampered or moved)."""


class SealingKey:
    """One customer's data key, ready to use: the AES-GCM object is made once per key
    (not per value), so sealing a field costs an HMAC and an encryption (~3 µs)."""

    __slots__ = (
        "_aead",
        "_blob_aead",
        "_blob_key",
        "_nonce_mac",
        "created_at",
        "customer_id",
        "key_id",
        "tenant_id",
    )

    def __init__(
        self, tenant_id: str, customer_id: str, key_id: str, key: bytes, created_at: int = 0
    ) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a data key is {KEY_BYTES} bytes")
        self.tenant_id = tenant_id
        self.customer_id = customer_id
        self.key_id = key_id
        self.created_at = created_at
        self._aead = AESGCM(key)
        # Keyed once; each seal copies it (a fresh HMAC per value cost ~1 µs more).
        nonce_key = hmac.digest(key, b"kefu-sealing/nonce/v1", "sha256")
        self._nonce_mac = hmac.new(nonce_key, digestmod=hashlib.sha256)
        # Attachment blobs (connectors/sealed_blobs.py): a key of their own, derived.
        self._blob_key = hmac.digest(key, b"kefu-sealing/blob/v1", "sha256")
        self._blob_aead: AESGCM | None = None

    def blob_cipher(self) -> AESGCM:
        """The AES-GCM object that seals this customer's attachment blobs (under a key
        derived from the data key, apart from the one of the fields)."""
        if self._blob_aead is None:
            self._blob_aead = AESGCM(self._blob_key)
        return self._blob_aead

    def _aad(self, tenant_id: str, event_id: str, field: str) -> bytes:
        return _SEP.join(
            (tenant_id.encode(), self.customer_id.encode(), event_id.encode(), field.encode())
        )

    def seal(self, text: str, tenant_id: str, event_id: str, field: str) -> str:
        aad = self._aad(tenant_id, event_id, field)
        plain = text.encode()
        mac = self._nonce_mac.copy()
        mac.update(aad + _SEP + plain)
        nonce = mac.digest()[:12]
        body = base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, plain, aad))
        return f"{PREFIX}{self.key_id}:{body.decode('ascii')}"

    def open(self, token: str, tenant_id: str, event_id: str, field: str) -> str:
        try:
            raw = base64.urlsafe_b64decode(token[len(PREFIX) + KEY_ID_CHARS + 1 :])
            aad = self._aad(tenant_id, event_id, field)
            return self._aead.decrypt(raw[:12], raw[12:], aad).decode()
        except (InvalidTag, binascii.Error, ValueError) as exc:
            raise SealError(f"sealed {field} of {event_id} does not open") from exc


def new_key_id(random: bytes) -> str:
    """A key id from 8 random bytes."""
    return random[:8].hex()


def key_id_of(value: str) -> str | None:
    """The key id a sealed value names (None: not a sealed value)."""
    if not value.startswith(PREFIX):
        return None
    key_id = value[len(PREFIX) : len(PREFIX) + KEY_ID_CHARS]
    if len(key_id) != KEY_ID_CHARS or value[len(PREFIX) + KEY_ID_CHARS :][:1] != ":":
        return None
    return key_id


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and key_id_of(value) is not None


# --- sealing (the conversation agent, before its events go on the log) --------------


_SET = object.__setattr__


def seal_event(event: Event, key: SealingKey) -> Event:
    """``event`` with its personal fields sealed under ``key`` (the same object when
    it has none to seal)."""
    name = type(event).__name__
    fields = SEALED.get(name)
    if fields is None:
        return event
    changes: dict[str, Any] = {}
    for field in fields:
        value = getattr(event, field)
        if value and not is_sealed(value):
            changes[field] = key.seal(value, event.tenant_id, event.event_id, field)
    if name in WITH_ATTACHMENTS:
        attachments = getattr(event, "attachments", ())
        if attachments:
            changes["attachments"] = tuple(
                dataclasses.replace(
                    a,
                    name=key.seal(a.name, event.tenant_id, event.event_id, f"attachments.{i}.name"),
                )
                if a.name and not is_sealed(a.name)
                else a
                for i, a in enumerate(attachments)
            )
    if not changes:
        return event
    # A copy with those fields replaced: ``dataclasses.replace`` costs ~15 µs here.
    new = object.__new__(type(event))
    for field_name in _field_names(type(event)):
        _SET(new, field_name, changes.get(field_name, getattr(event, field_name)))
    return new


class KeySource(Protocol):
    """Where the sealing side gets a customer's key (``connectors/keystore.py``)."""

    def current(self, tenant_id: str, customer_id: str) -> SealingKey | None: ...

    def ensure(self, tenant_id: str, customer_id: str) -> Awaitable[SealingKey]: ...

    def drain_sent(self) -> list[Any]:
        """Delivery futures of keys published since the last call: checked before the
        offsets of what was sealed with them are committed."""
        ...


async def seal_events(
    events: Sequence[Event], customers: Mapping[str, str], keys: KeySource
) -> list[Event]:
    """``events`` with every personal field sealed under its customer's key (made the
    first time a customer needs one). ``customers``: conversation id -> customer id
    (a conversation is one customer's); an event of a conversation with no customer
    yet is left as it is."""
    out = list(events)
    for i, event in enumerate(events):
        if type(event).__name__ not in SEALED:
            continue
        customer = customers.get(event.conversation_id) or str(getattr(event, "customer_id", ""))
        if not customer:
            continue
        key = keys.current(event.tenant_id, customer)
        if key is None:
            key = await keys.ensure(event.tenant_id, customer)
        out[i] = seal_event(event, key)
    return out


# --- opening (every reader, through the codec) ---------------------------------------

Lookup = Callable[[str], SealingKey | None]  # key id -> its key; None: erased


def open_fields(
    fields: dict[str, Any], names: tuple[str, ...], files: bool, lookup: Lookup
) -> None:
    """The decoded ``fields`` of one event with its sealed values opened in place
    (:data:`ERASED` where the key is gone)."""
    for name in names:
        value = fields.get(name)
        if value and value.startswith(PREFIX):
            fields[name] = _open(value, fields, name, lookup)
    if files:
        for i, attachment in enumerate(fields.get("attachments") or ()):
            value = attachment.get("name")
            if value and value.startswith(PREFIX):
                attachment["name"] = _open(value, fields, f"attachments.{i}.name", lookup)


def _open(value: str, fields: Mapping[str, Any], name: str, lookup: Lookup) -> str:
    key_id = key_id_of(value)
    if key_id is None:
        return value  # looks like one, is not (a customer may type anything)
    key = lookup(key_id)
    if key is None:
        return ERASED
    try:
        return key.open(value, str(fields["tenant_id"]), str(fields["event_id"]), name)
    except SealError as exc:
        raise DecodeError(str(exc)) from exc


def redact_fields(type_name: str, fields: dict[str, Any]) -> bool:
    """Every personal field of an event's decoded fields set to :data:`ERASED`, whatever
    the keys say (the read models' redaction on ``CustomerErased``); whether any was."""
    changed = False
    for name in SEALED.get(type_name, ()):
        if fields.get(name) and fields[name] != ERASED:
            fields[name] = ERASED
            changed = True
    if type_name in WITH_ATTACHMENTS:
        for attachment in fields.get("attachments") or ():
            if attachment.get("name") and attachment["name"] != ERASED:
                attachment["name"] = ERASED
                changed = True
    return changed


def install(lookup: Lookup, codec: AvroCodec = CODEC) -> None:
    """Every decode of a sealed event type by ``codec`` opens its sealed fields with
    ``lookup`` (the process-wide unsealer; installed once at a process's start)."""
    for type_name, names in SEALED.items():
        codec.openers[RECORD_TYPES[type_name]] = partial(
            open_fields, names=names, files=type_name in WITH_ATTACHMENTS, lookup=lookup
        )


def uninstall(codec: AvroCodec = CODEC) -> None:
    codec.openers.clear()


def installed(codec: AvroCodec = CODEC) -> bool:
    return bool(codec.openers)


def data_key_digest(master: bytes) -> bytes:
    """The 256-bit key that wraps data keys, from the configured master key."""
    return hashlib.sha256(b"kefu-data-keys/" + master).digest()
