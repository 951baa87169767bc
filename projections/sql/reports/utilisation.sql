-- Agent utilisation in the window: time holding conversations over the capacity they
-- were online for (sum of capacity x online time), per agent. Intervals are clipped
-- to the window; one still open ends now.
WITH
    online AS
    (
        SELECT
            agent_id,
            sum(dateDiff('second', greatest(started_at, {since}),
                         least(ifNull(ended_at, now64(3)), {until}))) AS online_s,
            sum(capacity * dateDiff('second', greatest(started_at, {since}),
                                    least(ifNull(ended_at, now64(3)), {until}))) AS capacity_s
        FROM {database}.agent_presence
        WHERE ({tenant} = '' OR tenant_id = {tenant}) AND presence != 'offline'
            AND started_at < {until} AND ifNull(ended_at, now64(3)) > {since}
        GROUP BY agent_id
    ),
    busy AS
    (
        SELECT
            assignee AS agent_id,
            count() AS assignments,
            sum(dateDiff('second', greatest(started_at, {since}),
                         least(ifNull(ended_at, now64(3)), {until}))) AS busy_s
        FROM {database}.assignments
        WHERE ({tenant} = '' OR tenant_id = {tenant}) AND assignee NOT IN ('', 'ai')
            AND started_at < {until} AND ifNull(ended_at, now64(3)) > {since}
        GROUP BY agent_id
    )
SELECT
    online.agent_id AS agent,
    round(online.online_s / 3600, 2) AS online_hours,
    busy.assignments AS assignments,
    round(busy.busy_s / 3600, 2) AS busy_hours,
    round(if(online.capacity_s = 0, 0, busy.busy_s / online.capacity_s), 3) AS utilisation
FROM online
LEFT JOIN busy ON busy.agent_id = online.agent_id
ORDER BY agent
