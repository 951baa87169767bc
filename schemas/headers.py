"""The tenant in Kafka record headers: every record kefu produces for a tenant carries
``kefu-tenant``, so a broker ACL proxy, a mirror or an auditor's consumer can filter or
check records by tenant without decoding them (keys are conversation ids, which are
derived from the tenant but do not name it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.tracing import HeadersIn

TENANT_HEADER = "kefu-tenant"


def with_tenant(headers: Any, tenant_id: str | None) -> Any:
    """``headers`` (None, a list of pairs or a mapping, as aiokafka and Faust take them)
    plus the tenant header; unchanged without a tenant (a dead letter of an unreadable
    record)."""
    if not tenant_id:
        return headers
    pair = (TENANT_HEADER, tenant_id.encode())
    if headers is None:
        return [pair]
    if isinstance(headers, Mapping):
        return {**headers, TENANT_HEADER: pair[1]}
    return [*headers, pair]


def tenant_of(headers: HeadersIn) -> str | None:
    """The tenant a record's headers name, if any."""
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in pairs:
        if name == TENANT_HEADER:
            return bytes(value).decode()
    return None
