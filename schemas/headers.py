"""The tenant in Kafka record headers: every record kefu produces for a tenant carries
``kefu-tenant``, so a broker ACL proxy, a mirror or an auditor's consumer can filter or
check records by tenant without decoding them (keys are conversation ids, which are
derived from the tenant but do not name it)."""

from __future__ import annotations

from typing import Any

from schemas.tracing import Headers, HeadersIn, merged, pairs

TENANT_HEADER = "kefu-tenant"


def with_tenant(headers: Any, tenant_id: str | None) -> Any:
    """``headers`` (None, a list of pairs or a mapping, as aiokafka and Faust take them)
    plus the tenant header; unchanged without a tenant (a dead letter of an unreadable
    record)."""
    return merged(headers, tenant_headers(tenant_id))


def tenant_headers(tenant_id: str | None) -> Headers:
    """The tenant header as pairs to add; none without a tenant."""
    return [(TENANT_HEADER, tenant_id.encode())] if tenant_id else []


def tenant_of(headers: HeadersIn) -> str | None:
    """The tenant a record's headers name, if any."""
    for name, value in pairs(headers):
        if name == TENANT_HEADER:
            return bytes(value).decode()
    return None
