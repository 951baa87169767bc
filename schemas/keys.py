"""Redis key names: the contract between the Redis projection (writer) and the
gateway and CLI (readers). Every key starts with the tenant, so no key is shared."""


def conversation_key(tenant_id: str, conversation_id: str) -> str:
    """Hash: status, channel, assignee, counts, times, seq."""
    return f"kefu:{tenant_id}:conv:{conversation_id}"


def messages_key(tenant_id: str, conversation_id: str) -> str:
    """List: the most recent messages in and out, as JSON."""
    return f"kefu:{tenant_id}:conv:{conversation_id}:messages"


def conversations_key(tenant_id: str) -> str:
    """Sorted set: conversation ids by last activity."""
    return f"kefu:{tenant_id}:conversations"


def outbox_channel(tenant_id: str, conversation_id: str) -> str:
    """Pub/sub channel where live sockets of a conversation listen for replies."""
    return f"kefu:{tenant_id}:out:{conversation_id}"
