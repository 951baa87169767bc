-- Messages per channel per {bucket}: in (customers) and out (AI and agent replies).
SELECT
    toStartOfInterval(occurred_at, INTERVAL 1 {bucket}) AS time,
    channel,
    countIf(direction = 'in') AS messages_in,
    countIf(direction = 'out') AS messages_out
FROM {database}.messages
WHERE ({tenant} = '' OR tenant_id = {tenant}) AND occurred_at >= {since} AND occurred_at < {until}
GROUP BY time, channel
ORDER BY time, channel
