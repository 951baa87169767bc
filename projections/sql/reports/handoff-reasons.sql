-- Handoffs in the window by reason and direction (ai -> human, human -> ai, ...).
SELECT
    reason,
    direction,
    count() AS handoffs,
    uniqExact(conversation_id) AS conversations
FROM {database}.handoffs
WHERE ({tenant} = '' OR tenant_id = {tenant}) AND occurred_at >= {since} AND occurred_at < {until}
GROUP BY reason, direction
ORDER BY handoffs DESC, reason, direction
