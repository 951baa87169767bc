-- Handoff rate: the share of conversations started in the window that were handed off
-- at least once, per channel.
SELECT
    channel,
    count() AS conversations,
    countIf(handoffs > 0) AS handed_off,
    round(handed_off / conversations, 3) AS handoff_rate
FROM {database}.conversation_facts
WHERE ({tenant} = '' OR tenant_id = {tenant}) AND started_at >= {since} AND started_at < {until}
GROUP BY channel
ORDER BY channel
