"""Deterministic ids at the edge: the same channel message always maps to the same
command, so a channel's retry (or a client's resend) is dropped downstream."""

from __future__ import annotations

import uuid

_NAMESPACE = uuid.UUID("3c0e6f4a-8b5d-4a21-9f3e-7d2c1b0a5e84")


def conversation_id_for(tenant_id: str, channel: str, customer_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"conversation/{tenant_id}/{channel}/{customer_id}"))


def command_id_for(tenant_id: str, channel: str, channel_message_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"message/{tenant_id}/{channel}/{channel_message_id}"))
