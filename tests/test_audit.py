"""Audit: a conversation's history is exported with a hash chain over its exact bytes;
verify recomputes it from the log and names the first broken link when an exported
record, or an event stored in the ClickHouse archive, was altered."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from kefu.settings import Settings
from projections.audit import GENESIS, Entry, chain, describe, verify_entries
from projections.clickhouse_events import compact_rows, row_for
from schemas.codec import CODEC
from schemas.records import Event
from tests.conftest import wait_for
from tests.test_replay import cli, private_traffic, settled


def rechain(lines: list[dict[str, Any]]) -> None:
    """What a careful forger does: fix every hash, link and the head after an edit."""
    previous = GENESIS
    for line in lines[:-1]:
        raw = base64.b64decode(line["avro_base64"])
        line["sha256"] = hashlib.sha256(raw).hexdigest()
        previous = hashlib.sha256(previous + raw).digest()
        line["link"] = previous.hex()
        event = CODEC.decode(raw)
        assert isinstance(event, Event)
        line["event"] = describe(event)
    lines[-1]["head"] = previous.hex()


def write(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), "utf-8")


def test_chain_is_over_exact_bytes() -> None:
    assert chain([b"a", b"b"])[1] == hashlib.sha256(chain([b"a"])[0] + b"b").digest()
    gap = verify_entries([Entry(1, b"x"), Entry(3, b"y")])
    assert not gap.ok and gap.broken_at == 2


def test_export_verify_and_tampering(pipeline: Settings, tmp_path: Path) -> None:
    tenant = f"audit-{uuid.uuid4().hex[:8]}"
    (conversation,) = private_traffic(pipeline, tenant, conversations=1)
    wait_for(lambda: settled(pipeline, tenant, [conversation]), timeout=60, what="traffic")

    shown = cli(pipeline, "audit", "show", "--conversation", conversation)
    assert shown.exit_code == 0, shown.output
    assert "MessageReceived" in shown.output and "verified" in shown.output
    assert "customer cust-0" in shown.output and '"verdict": "mask"' in shown.output

    export = tmp_path / "history.jsonl"
    done = cli(pipeline, "audit", "export", "--conversation", conversation, "--out", str(export))
    assert done.exit_code == 0, done.output
    lines = [json.loads(x) for x in export.read_text("utf-8").splitlines()]
    events = len(lines) - 1
    assert lines[-1]["events"] == events >= 4 and lines[-1]["tenant_id"] == tenant

    ok = cli(pipeline, "audit", "verify", "--conversation", conversation, "--export", str(export))
    assert ok.exit_code == 0, ok.output
    assert f"{events} events, chain head {lines[-1]['head']}" in ok.output
    both = cli(pipeline, "audit", "verify", "--conversation", conversation)  # log vs archive
    assert both.exit_code == 0 and "the log against the archive" in both.output, both.output
    archived = cli(
        pipeline, "audit", "export", "--conversation", conversation, "--source", "archive"
    )
    assert archived.output.splitlines()[-1] == json.dumps(lines[-1], ensure_ascii=False)

    def verify(altered: list[dict[str, Any]]) -> str:
        path = tmp_path / f"altered-{uuid.uuid4().hex[:6]}.jsonl"
        write(path, altered)
        result = cli(
            pipeline, "audit", "verify", "--conversation", conversation, "--export", str(path)
        )
        assert result.exit_code == 1, result.output
        return result.output

    # 1. The words of one record edited: they no longer match its bytes.
    words = json.loads(json.dumps(lines))
    words[0]["event"]["text"] = "I never said that"
    assert "seq 1: the words differ from the event bytes" in verify(words)

    # 2. The bytes edited, hashes left: the hash no longer matches.
    raw = base64.b64decode(lines[0]["avro_base64"])
    forged = raw.replace(b"where is my order?", b"cancel my orders!!")
    assert forged != raw and CODEC.decode(forged)
    edited = json.loads(json.dumps(lines))
    edited[0]["avro_base64"] = base64.b64encode(forged).decode()
    assert "seq 1: bytes do not match their sha256" in verify(edited)

    # 3. A careful forger recomputes every hash and link: the log still disagrees.
    rechain(edited)
    assert "seq 1: differs from the source" in verify(edited)

    # 4. A record dropped: the chain breaks where it was.
    dropped = json.loads(json.dumps(lines))
    del dropped[1]
    assert "seq 2: out of sequence" in verify(dropped)

    # 5. One event altered in the ClickHouse archive: log and archive disagree there.
    event = CODEC.decode(forged)
    assert isinstance(event, Event)
    row = row_for(event, lines[0]["partition"], lines[0]["offset"], forged)
    url = f"http://127.0.0.1:{pipeline.clickhouse.query_port}/events"
    assert httpx.post(url, content=compact_rows([row])).status_code == 200
    broken = cli(pipeline, "audit", "verify", "--conversation", conversation)
    assert broken.exit_code == 1
    assert "seq 1: the log and the archive differ" in broken.output


@pytest.mark.parametrize("command", ["show", "export", "verify"])
def test_unknown_conversation(pipeline: Settings, command: str) -> None:
    result = cli(pipeline, "audit", command, "--conversation", "no-such-conversation")
    if command == "export":
        assert result.exit_code == 1 and "no events" in result.output
    else:
        assert result.exit_code == 0, result.output  # an empty history is a valid one
