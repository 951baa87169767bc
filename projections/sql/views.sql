-- The analysts' views over {database}.events. Each reads event types by name and their
-- fields from the payload JSON (JSONExtract*), so a view whose events do not exist yet
-- (routing's assignment, handoff, presence, CSAT events) returns no rows, not an error.
-- Statements are separated by a line holding only ";". Created (or replaced) by the
-- ClickHouse projector at start, so a new view ships with the code.
--
-- Event types and payload fields read here:
--   MessageReceived (channel), ReplyProduced (author: "ai" or an agent id),
--   MessageModerated (direction, verdict, categories), ConversationRouted (assignee,
--   queue, priority), ConversationClosed (reason, closed_by),
--   ConversationQueued (queue, priority, position), ConversationAssigned (assignee,
--   queue, priority), ConversationHandedOff (from_assignee, to_assignee, reason),
--   AgentPresenceChanged (agent_id, presence, capacity), CsatRated (rating 1-5);
--   MessageReceived and ReplyProduced's attachments (kind, mime_type, size: metadata;
--   the bytes are in the blob store).

-- One row per message, in (customer) or out (AI or agent reply).
CREATE OR REPLACE VIEW {database}.messages AS
SELECT
    tenant_id,
    conversation_id,
    event_id,
    occurred_at,
    channel,
    if(type = 'MessageReceived', 'in', 'out') AS direction,
    if(type = 'MessageReceived', 'customer', JSONExtractString(payload, 'author')) AS author
FROM {database}.events FINAL
WHERE type IN ('MessageReceived', 'ReplyProduced')
;
-- Who holds a conversation after each routing event ('' = nobody: queued or closed),
-- and until when (the next such event, or NULL while it still holds).
CREATE OR REPLACE VIEW {database}.assignments AS
SELECT
    tenant_id,
    conversation_id,
    seq,
    type,
    occurred_at AS started_at,
    assignee,
    queue,
    nullIf(ended_at, toDateTime64(0, 3, 'UTC')) AS ended_at
FROM
(
    SELECT
        tenant_id,
        conversation_id,
        seq,
        type,
        occurred_at,
        multiIf(
            type = 'ConversationHandedOff', JSONExtractString(payload, 'to_assignee'),
            type IN ('ConversationRouted', 'ConversationAssigned'), JSONExtractString(payload, 'assignee'),
            ''
        ) AS assignee,
        JSONExtractString(payload, 'queue') AS queue,
        leadInFrame(occurred_at, 1, toDateTime64(0, 3, 'UTC')) OVER (
            PARTITION BY tenant_id, conversation_id ORDER BY seq
            ROWS BETWEEN CURRENT ROW AND 1 FOLLOWING
        ) AS ended_at
    FROM {database}.events FINAL
    WHERE type IN ('ConversationRouted', 'ConversationQueued', 'ConversationAssigned',
                   'ConversationHandedOff', 'ConversationClosed')
)
;
-- One row per conversation: where it came from, who handled it, how fast.
CREATE OR REPLACE VIEW {database}.conversation_facts AS
SELECT
    tenant_id,
    conversation_id,
    argMinIf(channel, seq, type = 'MessageReceived') AS channel,
    argMaxIf(JSONExtractString(payload, 'queue'), seq,
             type IN ('ConversationRouted', 'ConversationQueued', 'ConversationAssigned')) AS queue,
    -- A queue is "<tenant>:<team>"; the team is what follows the tenant.
    if(position(queue, ':') > 0, substring(queue, position(queue, ':') + 1), queue) AS team,
    argMaxIf(
        if(type = 'ConversationHandedOff', JSONExtractString(payload, 'to_assignee'),
           JSONExtractString(payload, 'assignee')),
        seq,
        type IN ('ConversationRouted', 'ConversationAssigned', 'ConversationHandedOff')
        AND if(type = 'ConversationHandedOff', JSONExtractString(payload, 'to_assignee'),
               JSONExtractString(payload, 'assignee')) NOT IN ('', 'ai')
    ) AS agent,
    minIf(occurred_at, type = 'MessageReceived') AS started_at,
    countIf(type = 'MessageReceived') AS customer_messages,
    countIf(type = 'ReplyProduced') AS replies,
    countIf(type = 'ReplyProduced' AND JSONExtractString(payload, 'author') != 'ai') AS human_replies,
    if(replies > 0,
       toInt64(toUnixTimestamp64Milli(minIf(occurred_at, type = 'ReplyProduced'))
               - toUnixTimestamp64Milli(started_at)),
       NULL) AS first_response_ms,
    countIf(type = 'ConversationClosed') > 0 AS closed,
    if(closed,
       toInt64(toUnixTimestamp64Milli(maxIf(occurred_at, type = 'ConversationClosed'))
               - toUnixTimestamp64Milli(started_at)),
       NULL) AS resolution_ms,
    countIf(type = 'ConversationHandedOff') AS handoffs,
    -- A human took part: an agent was assigned or handed it, or wrote a reply.
    (agent != '' OR human_replies > 0) AS human_involved,
    argMaxIf(JSONExtractInt(payload, 'rating'), seq, type = 'CsatRated') AS csat
FROM {database}.events FINAL
GROUP BY tenant_id, conversation_id
HAVING customer_messages > 0
;
-- One row per moderated message that matched a category (pass verdicts are not hits).
CREATE OR REPLACE VIEW {database}.moderation_hits AS
SELECT
    tenant_id,
    conversation_id,
    occurred_at,
    channel,
    JSONExtractString(payload, 'direction') AS direction,
    JSONExtractString(payload, 'verdict') AS verdict,
    arrayJoin(JSONExtract(payload, 'categories', 'Array(String)')) AS category
FROM {database}.events FINAL
WHERE type = 'MessageModerated' AND JSONExtractString(payload, 'verdict') != 'pass'
;
-- One row per handoff (AI to human, human to AI, human to human).
CREATE OR REPLACE VIEW {database}.handoffs AS
SELECT
    tenant_id,
    conversation_id,
    occurred_at,
    JSONExtractString(payload, 'from_assignee') AS from_assignee,
    JSONExtractString(payload, 'to_assignee') AS to_assignee,
    JSONExtractString(payload, 'reason') AS reason,
    concat(if(from_assignee = 'ai', 'ai', 'human'), ' -> ', if(to_assignee = 'ai', 'ai', 'human'))
        AS direction
FROM {database}.events FINAL
WHERE type = 'ConversationHandedOff'
;
-- Each agent's presence from one change to the next (NULL end: still so).
CREATE OR REPLACE VIEW {database}.agent_presence AS
SELECT
    tenant_id,
    agent_id,
    presence,
    capacity,
    started_at,
    nullIf(ended_at, toDateTime64(0, 3, 'UTC')) AS ended_at
FROM
(
    SELECT
        tenant_id,
        JSONExtractString(payload, 'agent_id') AS agent_id,
        JSONExtractString(payload, 'presence') AS presence,
        JSONExtractUInt(payload, 'capacity') AS capacity,
        occurred_at AS started_at,
        leadInFrame(occurred_at, 1, toDateTime64(0, 3, 'UTC')) OVER (
            PARTITION BY tenant_id, agent_id ORDER BY occurred_at, event_id
            ROWS BETWEEN CURRENT ROW AND 1 FOLLOWING
        ) AS ended_at
    FROM {database}.events FINAL
    WHERE type = 'AgentPresenceChanged'
)
;
-- One row per CSAT answer.
CREATE OR REPLACE VIEW {database}.csat AS
SELECT
    tenant_id,
    conversation_id,
    occurred_at,
    toUInt8(JSONExtractInt(payload, 'rating')) AS rating
FROM {database}.events FINAL
WHERE type = 'CsatRated'
;
-- One row per attachment of a message in (customer) or out (AI or agent reply). The
-- list is extracted once per message row; ARRAY JOIN drops messages without any.
CREATE OR REPLACE VIEW {database}.attachments AS
SELECT
    tenant_id,
    conversation_id,
    event_id,
    occurred_at,
    channel,
    direction,
    author,
    JSONExtractString(attachment, 'kind') AS kind,
    JSONExtractString(attachment, 'mime_type') AS mime_type,
    JSONExtractUInt(attachment, 'size') AS size
FROM
(
    SELECT
        tenant_id,
        conversation_id,
        event_id,
        occurred_at,
        channel,
        if(type = 'MessageReceived', 'in', 'out') AS direction,
        if(type = 'MessageReceived', 'customer', JSONExtractString(payload, 'author')) AS author,
        JSONExtractArrayRaw(payload, 'attachments') AS listed
    FROM {database}.events FINAL
    WHERE type IN ('MessageReceived', 'ReplyProduced')
)
ARRAY JOIN listed AS attachment
