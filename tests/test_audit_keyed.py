"""The audit an insider cannot rewrite (projections/audit_keyed.py): each tampering is
detected, and the checkpoint job signs what is on the running stack's log."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import uuid

import httpx

from connectors.identity import conversation_id_for
from kefu.settings import Settings
from projections.audit import GENESIS, Entry, chain, read_log
from projections.audit_keyed import (
    checkpoint,
    checkpoint_log,
    keyed_chain,
    read_checkpoints,
    signature,
    tenant_key,
    verify_keyed,
)
from schemas.codec import CODEC
from schemas.records import MessageModerated
from schemas.topics import TopicNames
from tests.conftest import wait_for

MASTER = b"audit-master-key"
KEY = tenant_key(MASTER, "t1")


def history(texts: list[str]) -> list[Entry]:
    out = []
    for seq, text in enumerate(texts, start=1):
        event = MessageModerated(
            event_id=f"e{seq}",
            conversation_id="c1",
            tenant_id="t1",
            seq=seq,
            occurred_at=1_700_000_000_000 + seq,
            message_event_id=f"m{seq}",
            direction="in",
            verdict="pass",
            text=text,
        )
        out.append(Entry(seq, CODEC.encode(event)))
    return out


def rewritten(entries: list[Entry], seq: int, text: str) -> list[Entry]:
    event = CODEC.decode(entries[seq - 1].raw)
    assert isinstance(event, MessageModerated)
    out = list(entries)
    out[seq - 1] = Entry(seq, CODEC.encode(dataclasses.replace(event, text=text)))
    return out


ORIGINAL = history(["hello", "my order 123", "refund please", "thanks", "bye"])
SIGNED = [
    checkpoint(KEY, "t1", "c1", ORIGINAL[:3], at=1),
    checkpoint(KEY, "t1", "c1", ORIGINAL, at=2),
]
CHECKPOINTS = [c for c in SIGNED if c is not None]


def test_an_untouched_history_verifies() -> None:
    verdict = verify_keyed(ORIGINAL, CHECKPOINTS, KEY)
    assert verdict.ok and verdict.events == 5


def test_a_rewritten_event_is_detected() -> None:
    verdict = verify_keyed(rewritten(ORIGINAL, 2, "my order 999"), CHECKPOINTS, KEY)
    assert not verdict.ok and verdict.broken_at == 1 and "rewritten" in verdict.reason
    late = verify_keyed(rewritten(ORIGINAL, 5, "goodbye"), CHECKPOINTS, KEY)
    assert not late.ok and late.broken_at == 4  # between the two checkpoints


def test_a_recomputed_plain_chain_does_not_help_without_the_key() -> None:
    """The insider rewrites seq 2 and recomputes what they can (the plain sha256 chain,
    a keyed chain under a guessed key): the signed checkpoints still say no."""
    forged = rewritten(ORIGINAL, 2, "my order 999")
    assert chain(e.raw for e in forged) != chain(e.raw for e in ORIGINAL)  # they recompute
    guessed = hashlib.sha256(b"guess").digest()
    fake = checkpoint(guessed, "t1", "c1", forged)
    assert fake is not None
    verdict = verify_keyed(forged, [*CHECKPOINTS, fake], KEY)
    assert not verdict.ok


def test_a_removed_event_is_detected() -> None:
    verdict = verify_keyed([e for e in ORIGINAL if e.seq != 3], CHECKPOINTS, KEY)
    assert not verdict.ok and verdict.broken_at == 3 and "removed" in verdict.reason


def test_a_cut_tail_is_detected() -> None:
    verdict = verify_keyed(ORIGINAL[:4], CHECKPOINTS, KEY)
    assert not verdict.ok and "cut tail" in verdict.reason and verdict.broken_at == 5
    # Without checkpoints a cut tail is invisible: that is what they are for.
    assert verify_keyed(ORIGINAL[:4], [], KEY).ok


def test_a_forged_checkpoint_is_detected() -> None:
    cp = CHECKPOINTS[0]
    forged = dataclasses.replace(cp, head=keyed_chain(KEY, [b"x"])[0].hex())
    verdict = verify_keyed(ORIGINAL, [forged], KEY)
    assert not verdict.ok and "signature" in verdict.reason
    # Another tenant's key signs nothing of t1's.
    other = tenant_key(MASTER, "t2")
    assert signature(other, "c1", cp.seq, cp.head) != cp.signature
    assert bytes(32) == GENESIS


def test_the_checkpoint_job_signs_the_log_of_the_running_stack(pipeline: Settings) -> None:
    customer = f"audit-{uuid.uuid4().hex[:8]}"
    g = pipeline.gateway
    with httpx.Client(base_url=f"http://{g.host}:{g.port}", timeout=30) as http:
        for n in range(2):
            sent = http.post(
                "/v1/messages",
                json={"customer_id": customer, "text": f"question {n}", "message_id": f"a{n}"},
                headers={"X-Api-Key": "demo-test-key"},
            )
            assert sent.status_code == 202, sent.text
    conversation = conversation_id_for("demo", "api", customer)
    names = TopicNames(pipeline.topic_prefix)
    servers = pipeline.kafka.servers

    def answered() -> list[Entry] | None:
        entries = asyncio.run(read_log(servers, names.events, conversation))
        types = [CODEC.decode(e.raw).type for e in entries]
        return entries if types.count("ReplyProduced") >= 2 else None

    wait_for(answered, 60, "both replies on the log")
    written = asyncio.run(
        checkpoint_log(servers, names.events, names.audit_checkpoints, MASTER, tenant="demo")
    )
    assert written >= 1
    found = asyncio.run(read_checkpoints(servers, names.audit_checkpoints, conversation))
    # Delivery receipts may land meanwhile: the log now holds at least what was signed.
    entries = asyncio.run(read_log(servers, names.events, conversation))
    assert found and found[-1].seq >= 4 and found[-1].seq <= max(e.seq for e in entries)
    key = tenant_key(MASTER, "demo")
    assert verify_keyed(entries, found, key).ok
    cut = [e for e in entries if e.seq < found[-1].seq]
    assert not verify_keyed(cut, found, key).ok  # the signed last event cut: caught
    # Run again: a checkpoint only for a history that grew, never a second for the same.
    asyncio.run(
        checkpoint_log(servers, names.events, names.audit_checkpoints, MASTER, tenant="demo")
    )
    again = asyncio.run(read_checkpoints(servers, names.audit_checkpoints, conversation))
    assert len({c.seq for c in again}) == len(again)
