"""Redis key names: the contract between the Redis projection (writer) and the
gateway and CLI (readers). Every key starts with the tenant, so no key is shared."""


def tenant_prefix(tenant_id: str) -> str:
    """What every key of a tenant starts with (replay flushes a tenant by it)."""
    return f"kefu:{tenant_id}:"


def conversation_key(tenant_id: str, conversation_id: str) -> str:
    """Hash: status, channel, assignee, queue, priority, preview, unread, counts,
    first-response time, timestamps, seq."""
    return f"kefu:{tenant_id}:conv:{conversation_id}"


def messages_key(tenant_id: str, conversation_id: str) -> str:
    """List: the most recent messages in and out, as JSON."""
    return f"kefu:{tenant_id}:conv:{conversation_id}:messages"


def conversations_key(tenant_id: str) -> str:
    """Sorted set: conversation ids by last activity."""
    return f"kefu:{tenant_id}:conversations"


def status_prefix(tenant_id: str) -> str:
    return f"kefu:{tenant_id}:status:"


def status_key(tenant_id: str, status: str) -> str:
    """Sorted set: the tenant's conversations in ``status`` (open, closed), by last
    activity."""
    return f"{status_prefix(tenant_id)}{status}"


def unread_key(tenant_id: str) -> str:
    """Sorted set: conversations with customer messages not yet answered, scored by
    how many."""
    return f"kefu:{tenant_id}:unread"


def queue_prefix(tenant_id: str) -> str:
    return f"kefu:{tenant_id}:queue:"


def queue_key(tenant_id: str, queue: str) -> str:
    """Sorted set: conversations waiting in ``queue`` for a human, by priority then
    arrival; a conversation's position is its ZRANK."""
    return f"{queue_prefix(tenant_id)}{queue}"


def queue_seq_key(tenant_id: str, queue: str) -> str:
    """Hash: the last seq of a queue's own events applied (routing's queue stream)."""
    return f"kefu:{tenant_id}:queueseq:{queue}"


def assignee_prefix(tenant_id: str) -> str:
    return f"kefu:{tenant_id}:assignee:"


def assignee_key(tenant_id: str, assignee: str) -> str:
    """Sorted set: open conversations assigned to ``assignee`` ("ai" or an agent id);
    the agent's load is its ZCARD."""
    return f"{assignee_prefix(tenant_id)}{assignee}"


def agents_key(tenant_id: str) -> str:
    """Hash: agent id -> JSON {presence, capacity, at} (routing's presence events)."""
    return f"kefu:{tenant_id}:agents"


def outbox_channel(tenant_id: str, conversation_id: str) -> str:
    """Pub/sub channel where live sockets of a conversation listen for replies."""
    return f"kefu:{tenant_id}:out:{conversation_id}"


# Attachments: outside the read model's ``kefu:<tenant>:`` prefix, so a rebuild of the
# projection (which clears that prefix) keeps uploads waiting for their message and the
# tenant's storage count.
def upload_key(tenant_id: str, upload_id: str) -> str:
    """An upload waiting for the message that attaches it (JSON; expires)."""
    return f"kefu-files:{tenant_id}:upload:{upload_id}"


def blob_usage_key(tenant_id: str) -> str:
    """Bytes the tenant has in the blob store (its quota)."""
    return f"kefu-files:{tenant_id}:used"
