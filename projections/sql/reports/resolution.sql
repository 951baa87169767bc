-- The resolution time (first customer message to close),
-- p50 and p90 in seconds, per channel, team and agent ("ai" when no human held the
-- conversation), for conversations started in the window.
WITH facts AS
(
    SELECT channel, team, if(agent = '', 'ai', agent) AS agent, resolution_ms AS ms
    FROM {database}.conversation_facts
    WHERE ({tenant} = '' OR tenant_id = {tenant}) AND started_at >= {since} AND started_at < {until} AND resolution_ms IS NOT NULL
)
SELECT
    dimension,
    key,
    count() AS conversations,
    round(quantile(0.5)(ms) / 1000, 2) AS p50_s,
    round(quantile(0.9)(ms) / 1000, 2) AS p90_s
FROM
(
    SELECT 'channel' AS dimension, channel AS key, ms FROM facts
    UNION ALL
    SELECT 'team' AS dimension, team AS key, ms FROM facts
    UNION ALL
    SELECT 'agent' AS dimension, agent AS key, ms FROM facts
)
GROUP BY dimension, key
ORDER BY dimension, key
