-- SLA breaches in the window by kind (first / next response) and priority.
SELECT
    JSONExtractString(payload, 'kind') AS kind,
    JSONExtractString(payload, 'priority') AS priority,
    count() AS breaches,
    uniqExact(conversation_id) AS conversations
FROM {database}.events FINAL
WHERE type = 'SlaBreached'
    AND ({tenant} = '' OR tenant_id = {tenant}) AND occurred_at >= {since} AND occurred_at < {until}
GROUP BY kind, priority
ORDER BY breaches DESC, kind, priority
