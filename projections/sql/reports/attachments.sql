-- Attachments in the window per direction (in: customers, out: AI and agent replies),
-- channel and kind: how many, their bytes, the messages that carried them.
SELECT
    direction,
    channel,
    kind,
    count() AS attachments,
    sum(size) AS bytes,
    uniqExact(event_id) AS messages
FROM {database}.attachments
WHERE ({tenant} = '' OR tenant_id = {tenant}) AND occurred_at >= {since} AND occurred_at < {until}
GROUP BY direction, channel, kind
ORDER BY direction, channel, kind
