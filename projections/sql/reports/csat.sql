-- CSAT distribution: answers in the window per rating (1-5) and their share.
SELECT
    rating,
    count() AS responses,
    round(responses / sum(count()) OVER (), 3) AS share
FROM {database}.csat
WHERE ({tenant} = '' OR tenant_id = {tenant}) AND occurred_at >= {since} AND occurred_at < {until}
GROUP BY rating
ORDER BY rating
