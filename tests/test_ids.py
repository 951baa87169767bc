"""``schemas.ids.uuid5_text`` is ``str(uuid.uuid5(...))``: ids already on the log
(event ids, replies' idempotency keys, delivery ids) must come out the same."""

from __future__ import annotations

import random
import uuid

from schemas.ids import uuid5_text
from schemas.records import event_id_for


def test_the_same_text_as_uuid5_for_any_name() -> None:
    rng = random.Random(7)
    namespaces = [uuid.NAMESPACE_URL, uuid.NAMESPACE_DNS, uuid.UUID(int=rng.getrandbits(128))]
    names = ["", "m1", "acme:api:c1/cmd-1/0", "客服/会话/1", "emoji 🙂", "x" * 500]
    names += [
        "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(40)))
        for _ in range(300)
    ]
    for namespace in namespaces:
        for name in names:
            assert uuid5_text(namespace, name) == str(uuid.uuid5(namespace, name)), name


def test_event_ids_are_unchanged() -> None:
    # Frozen (computed with uuid.uuid5 before this module): ids already on the log.
    assert event_id_for("cmd-1", 0, "acme:api:c1") == "08be6e4b-ae26-5723-9b2f-362ab77d2301"
    assert event_id_for("m1", 3) == "81aab733-4465-5cfb-856a-357b71ed486b"
