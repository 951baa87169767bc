"""An audit an insider cannot rewrite: a keyed chain and signed checkpoints.

The plain chain of ``projections/audit.py`` (sha256) shows accidental damage, but
anyone who can write the events topic can rewrite a conversation and recompute it, and
a cut tail leaves no trace. Here:

- the chain is keyed: ``link_n = HMAC-SHA256(K_t, link_{n-1} || event_n bytes)``, with
  ``K_t`` the tenant's audit key, derived from ``security.audit_key`` (kept apart from
  the Kafka credentials);
- ``kefu audit checkpoint`` (run on a schedule) publishes, for every conversation whose
  history grew, ``AuditCheckpoint(seq, head = link_seq, signature = HMAC(K_t, ...))``
  to a topic of its own that is never compacted or expired.

``verify_keyed`` then recomputes the chain from the log and checks it against every
checkpoint: a rewritten event (with or without a recomputed plain chain) no longer
reaches the signed head; a removed event leaves a seq gap; a cut tail ends before a
checkpoint's seq; a forged checkpoint fails its signature.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from projections.audit import GENESIS, Entry, Verdict, ordered
from schemas.codec import CODEC, DecodeError
from schemas.records import AuditCheckpoint
from schemas.time import now_ms


def tenant_key(master: bytes, tenant: str) -> bytes:
    """The tenant's audit key: one tenant's key opens nothing of another's."""
    return hmac.new(master, b"kefu-audit/" + tenant.encode(), hashlib.sha256).digest()


def keyed_chain(key: bytes, raws: Iterable[bytes]) -> list[bytes]:
    links, previous = [], GENESIS
    for raw in raws:
        previous = hmac.new(key, previous + raw, hashlib.sha256).digest()
        links.append(previous)
    return links


def signature(key: bytes, conversation: str, seq: int, head: str) -> str:
    message = f"kefu-checkpoint|{conversation}|{seq}|{head}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def checkpoint(
    key: bytes, tenant: str, conversation: str, entries: Sequence[Entry], at: int = 0
) -> AuditCheckpoint | None:
    """The signed head of a (seq-ordered, gap-free) history; None when empty."""
    if not entries:
        return None
    head = keyed_chain(key, (e.raw for e in entries))[-1].hex()
    seq = entries[-1].seq
    return AuditCheckpoint(
        tenant_id=tenant,
        conversation_id=conversation,
        seq=seq,
        head=head,
        checkpointed_at=at or now_ms(),
        signature=signature(key, conversation, seq, head),
    )


def verify_keyed(
    entries: Sequence[Entry], checkpoints: Sequence[AuditCheckpoint], key: bytes
) -> Verdict:
    """The history on the log against every signed checkpoint of it."""
    history, problems = ordered(entries)
    if problems:  # a removed event leaves a gap; two versions of one seq conflict
        seq = int(problems[0].split()[1].rstrip(":"))
        return Verdict(False, len(history), "", seq, f"{problems[0]} (an event was removed?)")
    links = keyed_chain(key, (e.raw for e in history))
    head = links[-1].hex() if links else GENESIS.hex()
    checked_to = 0
    for cp in sorted(checkpoints, key=lambda c: c.seq):
        if not hmac.compare_digest(
            signature(key, cp.conversation_id, cp.seq, cp.head), cp.signature
        ):
            return Verdict(
                False, len(history), head, cp.seq, "a checkpoint's signature is invalid (forged?)"
            )
        if cp.seq > len(links):
            reason = f"the log ends at seq {len(links)}, a signed checkpoint saw seq {cp.seq}"
            return Verdict(False, len(history), head, len(links) + 1, f"cut tail: {reason}")
        if links[cp.seq - 1].hex() != cp.head:
            reason = (
                f"an event between seq {checked_to + 1} and {cp.seq} differs from the one the "
                "signed checkpoint covered (rewritten)"
            )
            return Verdict(False, len(history), head, checked_to + 1, reason)
        checked_to = cp.seq
    return Verdict(True, len(history), head)


# --- the log and the checkpoints topic ------------------------------------------------


async def _partitions(bootstrap: str, topic: str, options: Mapping[str, Any]) -> list[int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **dict(options))
    await admin.start()
    try:
        found: list[Any] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for t in found:
        if t.get("topic") == topic and not t.get("error_code"):
            return sorted(int(p["partition"]) for p in t.get("partitions", []))
    return []


async def read_all(
    bootstrap: str, topic: str, options: Mapping[str, Any]
) -> list[tuple[int, int, bytes]]:
    """(partition, offset, value) of every record now on ``topic``."""
    parts = [TopicPartition(topic, p) for p in await _partitions(bootstrap, topic, options)]
    if not parts:
        return []
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        **dict(options),
    )
    await consumer.start()
    try:
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        out: list[tuple[int, int, bytes]] = []
        pending = [tp for tp in parts if await consumer.position(tp) < ends[tp]]
        while pending:
            for tp, records in (await consumer.getmany(*pending, timeout_ms=1000)).items():
                out += [
                    (tp.partition, r.offset, r.value or b"") for r in records if r.offset < ends[tp]
                ]
            pending = [tp for tp in pending if await consumer.position(tp) < ends[tp]]
        return out
    finally:
        await consumer.stop()


async def read_checkpoints(
    bootstrap: str,
    topic: str,
    conversation: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[AuditCheckpoint]:
    out = []
    for _, _, value in await read_all(bootstrap, topic, options or {}):
        try:
            record = CODEC.decode(value)
        except DecodeError:
            continue
        if isinstance(record, AuditCheckpoint) and (
            conversation is None or record.conversation_id == conversation
        ):
            out.append(record)
    return out


def histories(records: Iterable[tuple[int, int, bytes]]) -> dict[tuple[str, str], list[Entry]]:
    """Every conversation's events on the log: (tenant, conversation) -> entries."""
    out: dict[tuple[str, str], list[Entry]] = {}
    for partition, offset, value in records:
        try:
            raws = CODEC.unpack(value)
        except DecodeError:
            continue
        for raw in raws:
            try:
                _, fields = CODEC.decode_fields(raw)
            except DecodeError:
                continue
            conversation = fields.get("conversation_id")
            if conversation and "seq" in fields:
                key = (str(fields["tenant_id"]), str(conversation))
                out.setdefault(key, []).append(Entry(int(fields["seq"]), raw, partition, offset))
    return out


async def checkpoint_log(
    bootstrap: str,
    events_topic: str,
    checkpoints_topic: str,
    master_key: bytes,
    options: Mapping[str, Any] | None = None,
    tenant: str | None = None,
) -> int:
    """Sign the head of every conversation whose history grew since its last
    checkpoint; the number of checkpoints written. A history with a gap or a
    conflict is not signed (``kefu audit verify`` names the problem)."""
    options = options or {}
    latest: dict[str, int] = {}
    for cp in await read_checkpoints(bootstrap, checkpoints_topic, None, options):
        latest[cp.conversation_id] = max(latest.get(cp.conversation_id, 0), cp.seq)
    found = histories(await read_all(bootstrap, events_topic, options))
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, **dict(options)
    )
    await producer.start()
    written = 0
    try:
        for (tenant_id, conversation), entries in sorted(found.items()):
            if tenant is not None and tenant_id != tenant:
                continue
            history, problems = ordered(entries)
            if problems or not history or history[-1].seq <= latest.get(conversation, 0):
                continue
            signed = checkpoint(tenant_key(master_key, tenant_id), tenant_id, conversation, history)
            assert signed is not None
            await producer.send_and_wait(
                checkpoints_topic, CODEC.encode(signed), key=conversation.encode()
            )
            written += 1
    finally:
        await producer.stop()
    return written
