-- AI deflection: of the conversations closed in the window, the share no human took
-- part in (no agent assigned or handed it, no agent reply), per channel.
SELECT
    channel,
    count() AS closed_conversations,
    countIf(NOT human_involved) AS closed_by_ai_alone,
    round(closed_by_ai_alone / closed_conversations, 3) AS deflection_rate
FROM {database}.conversation_facts
WHERE ({tenant} = '' OR tenant_id = {tenant}) AND closed AND started_at >= {since} AND started_at < {until}
GROUP BY channel
ORDER BY channel
