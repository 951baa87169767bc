-- Every event on the log, one row each. ReplacingMergeTree on the conversation's
-- (tenant, conversation, seq) key: a redelivered event replaces its twin, so use FINAL
-- (or count DISTINCT event_id) where exact counts matter before merges run.
-- avro_base64 is the event exactly as it was on the log (Avro single-object bytes,
-- base64): the archive audits verify against once Kafka's retention drops them.
CREATE TABLE IF NOT EXISTS {database}.events
(
    event_id        String,
    type            LowCardinality(String),
    tenant_id       LowCardinality(String),
    conversation_id String,
    seq             UInt64,
    occurred_at     DateTime64(3, 'UTC'),
    channel         LowCardinality(String),
    schema_version  UInt16,
    kafka_partition UInt16,
    kafka_offset    UInt64,
    payload         String CODEC(ZSTD(3)),
    avro_base64     String DEFAULT '' CODEC(ZSTD(3))
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant_id, conversation_id, seq)
