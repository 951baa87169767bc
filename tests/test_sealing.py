"""Crypto-shredding, the pure parts: sealing personal fields (``schemas/sealing.py``),
opening them in the codec, the erasure records' frozen bytes, the conversation agent's
``EraseCustomer`` decision and the Redis list's redaction."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from projections.redis_erase import redacted_entry
from schemas import sealing
from schemas.codec import CODEC, DecodeError
from schemas.records import (
    CustomerErased,
    DataKey,
    EraseCustomer,
    Event,
    MessageModerated,
    MessageReceived,
    NoteAdded,
    ReceiveMessage,
)
from schemas.sealing import ERASED, PREFIX, SealingKey, key_id_of, seal_event, seal_events
from streams.lifecycle import Conversation, Policy, Rejected, decide, evolve
from streams.moderation import Moderator, WordList
from streams.routing import Route
from tests.samples import PHOTO

ENV: dict[str, Any] = {"conversation_id": "conv-1", "tenant_id": "t1"}
KEY = SealingKey("t1", "u1", "0123456789abcdef", bytes(range(32)), 1)
OTHER = SealingKey("t1", "u2", "fedcba9876543210", bytes(range(1, 33)), 1)
RECEIVED = MessageReceived(
    event_id="e-1",
    seq=1,
    occurred_at=1_700_000_000_123,
    channel="api",
    customer_id="u1",
    text="我的地址是 北京市 1 号",
    channel_message_id="m1",
    command_id="c1",
    **ENV,
)

# Frozen bytes: never regenerate them. RECEIVED sealed under KEY (the sealed format of
# version 1), and the erasure records.
SEALED_RECEIVED = bytes.fromhex(
    "c301cb62e12637c857d806652d310c636f6e762d3104743102f6a1abfef9621e4d657373616765526563"
    "65697665640606617069047531e0016b6566752d7365616c65643a76313a303132333435363738396162"
    "636465663a693272434c75786744357569496f714f5759356945553767316c5a2d6839766e3271544c66"
    "2d35734d544d445a6d6a645443744c5f395a6358314459675f61476a384c79766b61726674586246496f"
    "3d046d310463310000"
)
ERASED_EVENT = bytes.fromhex(
    "c3014d056812fb84908806652d390c636f6e762d3104743112f6a1abfef9621c437573746f6d65724572"
    "6173656402047531126167656e743a6f70730e7265717565737406632d39022030313233343536373839"
    "61626364656600"
)
ERASE_COMMAND = bytes.fromhex(
    "c301e0ef7dd52cb8d3ee06632d390c636f6e762d31047431f6a1abfef9621a4572617365437573746f6d"
    "657202047531126167656e743a6f70730e72657175657374022030313233343536373839616263646566"
    "00"
)
DATA_KEY = bytes.fromhex(
    "c3016c9ea57986a3bd360474310475312030313233343536373839616263646566780001020304050607"
    "08090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f3031"
    "32333435363738393a3bf6a1abfef9620477310e446174614b657902"
)


@pytest.fixture
def keys() -> Iterator[dict[str, SealingKey]]:
    """The codec opens sealed fields with these keys (a key id missing: erased)."""
    known = {KEY.key_id: KEY, OTHER.key_id: OTHER}
    was = dict(CODEC.openers)
    sealing.install(known.get)
    try:
        yield known
    finally:
        CODEC.openers.clear()
        CODEC.openers.update(was)


def test_frozen_erasure_records_read_with_todays_schemas() -> None:
    erased = CODEC.decode(ERASED_EVENT)
    assert isinstance(erased, CustomerErased)
    assert (erased.customer_id, erased.requested_by, erased.reason) == (
        "u1",
        "agent:ops",
        "request",
    )
    assert (erased.seq, erased.key_ids, erased.command_id) == (9, ["0123456789abcdef"], "c-9")
    command = CODEC.decode(ERASE_COMMAND)
    assert isinstance(command, EraseCustomer) and command.key_ids == ["0123456789abcdef"]
    key = CODEC.decode(DATA_KEY)
    assert isinstance(key, DataKey) and key.wrapped == bytes(range(60))
    for frozen in (ERASED_EVENT, ERASE_COMMAND, DATA_KEY):
        assert CODEC.encode(CODEC.decode(frozen)) == frozen


def test_frozen_sealed_message_opens_with_its_key_and_reads_erased_without(
    keys: dict[str, SealingKey],
) -> None:
    assert CODEC.encode(seal_event(RECEIVED, KEY)) == SEALED_RECEIVED  # deterministic
    assert CODEC.decode(SEALED_RECEIVED) == RECEIVED
    del keys[KEY.key_id]  # the customer erased
    decoded = CODEC.decode(SEALED_RECEIVED)
    assert isinstance(decoded, MessageReceived)
    assert decoded.text == ERASED and decoded.customer_id == "u1" and decoded.seq == 1


def test_without_an_unsealer_a_process_sees_only_the_sealed_string() -> None:
    was = dict(CODEC.openers)  # the session's stack may have installed one
    CODEC.openers.clear()
    try:
        decoded = CODEC.decode(SEALED_RECEIVED)
    finally:
        CODEC.openers.update(was)
    assert isinstance(decoded, MessageReceived)
    assert decoded.text.startswith(PREFIX) and key_id_of(decoded.text) == KEY.key_id
    assert "北京" not in decoded.text and "北京".encode() not in SEALED_RECEIVED


def test_sealing_is_deterministic_and_never_reuses_a_nonce() -> None:
    a = KEY.seal("same words", "t1", "e-1", "text")
    assert KEY.seal("same words", "t1", "e-1", "text") == a  # a decision made again
    b = KEY.seal("other words", "t1", "e-1", "text")  # same event and field, new text
    nonce = base64.urlsafe_b64decode
    cut = len(PREFIX) + 17
    assert nonce(a[cut:])[:12] != nonce(b[cut:])[:12]
    assert KEY.seal("same words", "t1", "e-2", "text") != a  # another event


def test_a_sealed_value_moved_to_another_event_or_tenant_does_not_open(
    keys: dict[str, SealingKey],
) -> None:
    sealed = seal_event(RECEIVED, KEY)
    moved = dataclasses.replace(RECEIVED, event_id="e-2", text=sealed.text)  # type: ignore[attr-defined]
    with pytest.raises(DecodeError, match="does not open"):
        CODEC.decode(CODEC.encode(moved))
    other_tenant = dataclasses.replace(sealed, tenant_id="t2")
    with pytest.raises(DecodeError, match="does not open"):
        CODEC.decode(CODEC.encode(other_tenant))


def test_attachment_names_notes_and_moderated_text_are_sealed(
    keys: dict[str, SealingKey],
) -> None:
    with_file = dataclasses.replace(RECEIVED, attachments=(PHOTO,))
    moderated = MessageModerated(
        event_id="e-2",
        seq=2,
        occurred_at=1,
        message_event_id="e-1",
        direction="in",
        verdict="mask",
        text="我的电话是 ***",
        attachments=(PHOTO,),
        **ENV,
    )
    note = NoteAdded(
        event_id="e-3", seq=3, occurred_at=1, author="a1", text="VIP", command_id="c", **ENV
    )
    for event in (with_file, moderated, note):
        raw = CODEC.encode(seal_event(event, KEY))
        assert b"VIP" not in raw and PHOTO.name.encode() not in raw
        assert CODEC.decode(raw) == event
    del keys[KEY.key_id]
    opened = CODEC.decode(CODEC.encode(seal_event(with_file, KEY)))
    assert isinstance(opened, MessageReceived)
    assert opened.attachments[0].name == ERASED
    assert opened.attachments[0].sha256 == PHOTO.sha256  # metadata stays: not personal


def test_empty_text_and_other_event_types_are_left_as_they_are() -> None:
    assert seal_event(dataclasses.replace(RECEIVED, text=""), KEY).text == ""  # type: ignore[attr-defined]
    erased = CODEC.decode(ERASED_EVENT)
    assert isinstance(erased, Event) and seal_event(erased, KEY) is erased


def vars_of(event: Event) -> dict[str, object]:
    return event.to_avro()


class _Keys:
    def __init__(self) -> None:
        self.made: list[tuple[str, str]] = []

    def current(self, tenant_id: str, customer_id: str) -> SealingKey | None:
        return KEY if (tenant_id, customer_id) in self.made else None

    async def ensure(self, tenant_id: str, customer_id: str) -> SealingKey:
        self.made.append((tenant_id, customer_id))
        return KEY

    def drain_sent(self) -> list[object]:
        return []


def test_seal_events_makes_a_customers_key_once_and_uses_the_conversations_customer(
    keys: dict[str, SealingKey],
) -> None:
    note = NoteAdded(
        event_id="e-3", seq=2, occurred_at=1, author="a1", text="x", command_id="c", **ENV
    )
    source = _Keys()
    sealed = asyncio.run(seal_events([RECEIVED, note], {"conv-1": "u1"}, source))
    assert source.made == [("t1", "u1")]
    assert all(sealing.is_sealed(vars_of(e)["text"]) for e in sealed)
    assert [CODEC.decode(CODEC.encode(e)) for e in sealed] == [RECEIVED, note]


def test_sealing_costs_a_few_microseconds_a_field() -> None:
    """Not a timing assertion on the machine: a guard against an accidental
    per-value key setup (AESGCM made per call is ~10x this)."""
    started = time.perf_counter()
    for n in range(2000):
        KEY.seal("where is my order A-1?", "t1", f"e-{n}", "text")
    per_field_us = (time.perf_counter() - started) / 2000 * 1e6
    assert per_field_us < 200


def test_redact_fields_erases_every_personal_field_of_a_payload() -> None:
    _, fields = CODEC.decode_fields(
        CODEC.encode(dataclasses.replace(RECEIVED, attachments=(PHOTO,)))
    )
    assert sealing.redact_fields("MessageReceived", fields)
    assert fields["text"] == ERASED and fields["attachments"][0]["name"] == ERASED
    assert fields["customer_id"] == "u1"
    assert not sealing.redact_fields("MessageReceived", fields)  # idempotent
    assert not sealing.redact_fields("ConversationRouted", {"queue": "q"})


def test_a_redacted_list_entry_is_what_a_replay_would_list() -> None:
    live = orjson.dumps({"id": "e-1", "role": "customer", "text": "my address", "at": 1})
    replayed = orjson.dumps({"id": "e-1", "role": "customer", "text": ERASED, "at": 1})
    assert redacted_entry(live) == replayed
    assert redacted_entry(replayed) is None
    with_file = {"id": "e", "text": "", "attachments": [{"kind": "image", "name": "me.jpg"}]}
    assert orjson.loads(redacted_entry(orjson.dumps(with_file)) or b"") == {
        "id": "e",
        "text": "",
        "attachments": [{"kind": "image", "name": ERASED}],
    }


# --- the conversation agent's decision ----------------------------------------------


def _policy() -> Policy:
    return Policy(Moderator(WordList({}, {}, 0)), lambda *_: Route("", "t1:default", "normal", "r"))


def _erase(customer: str = "u1", command_id: str = "x-1") -> EraseCustomer:
    return EraseCustomer(
        command_id=command_id,
        issued_at=5,
        customer_id=customer,
        requested_by="agent:ops",
        reason="request",
        key_ids=["0123456789abcdef"],
        **ENV,
    )


def test_erase_appends_customer_erased_once_and_only_for_the_conversations_customer() -> None:
    policy = _policy()
    state = Conversation()
    message = ReceiveMessage(
        command_id="c1",
        issued_at=1,
        channel="api",
        customer_id="u1",
        text="hi",
        channel_message_id="m1",
        **ENV,
    )
    for event in decide(state, message, policy):
        state = evolve(state, event)
    assert state.recent
    events = decide(state, _erase(), policy)
    assert [type(e).__name__ for e in events] == ["CustomerErased"]
    erased = events[0]
    assert isinstance(erased, CustomerErased)
    assert (erased.seq, erased.occurred_at, erased.key_ids) == (
        state.seq + 1,
        5,
        ["0123456789abcdef"],
    )
    after = evolve(state, erased)
    assert after.recent == () and after.status == state.status
    assert decide(after, _erase(), policy) == []  # redelivered
    with pytest.raises(Rejected, match="another customer"):
        decide(after, _erase("u2", "x-2"), policy)
    with pytest.raises(Rejected, match="unknown conversation"):
        decide(Conversation(), _erase(), policy)
