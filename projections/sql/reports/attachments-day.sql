-- Attachments per day and tenant (every tenant's when {tenant} is ''), by direction
-- (in: customers, out: AI and agent replies), channel and kind: count and bytes.
SELECT
    toStartOfDay(occurred_at) AS day,
    tenant_id AS tenant,
    direction,
    channel,
    kind,
    count() AS attachments,
    sum(size) AS bytes,
    uniqExact(event_id) AS messages
FROM {database}.attachments
WHERE ({tenant} = '' OR tenant_id = {tenant}) AND occurred_at >= {since} AND occurred_at < {until}
GROUP BY day, tenant, direction, channel, kind
ORDER BY day, tenant, direction, channel, kind
