-- Moderation hits in the window by category, action and direction (in: customers,
-- out: replies).
SELECT
    category,
    verdict,
    direction,
    count() AS hits,
    uniqExact(conversation_id) AS conversations
FROM {database}.moderation_hits
WHERE ({tenant} = '' OR tenant_id = {tenant}) AND occurred_at >= {since} AND occurred_at < {until}
GROUP BY category, verdict, direction
ORDER BY hits DESC, category, verdict, direction
