"""The worker's librdkafka producer (``streams.hot_producer``) against the real broker:
records land where aiokafka (the gateway's client) puts the same key, delivery futures
resolve with their offsets, ``flush`` waits for them all, a record the broker cannot
take fails its send, and the deployment's security reaches librdkafka's settings."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from kefu.settings import KafkaSettings, Settings
from streams.hot_producer import Delivered, DeliveryFailed, HotProducer, librdkafka_config
from tests.kafka_helpers import new_topic, read_records


def test_records_are_delivered_where_aiokafka_puts_their_key(pipeline: Settings) -> None:
    async def scenario() -> None:
        topic = await new_topic(pipeline, "test-hot")
        hot = HotProducer(librdkafka_config(pipeline.kafka.servers, "test-hot", 1.0))
        reference = AIOKafkaProducer(bootstrap_servers=pipeline.kafka.servers)
        await reference.start()
        try:
            keys = [f"acme:api:c{i}".encode() for i in range(40)]
            sent = [await hot.send(topic, key, b"hot-" + key) for key in keys]
            sent.append(await hot.send(topic, b"k", b"with headers", None, None, [("h", b"1")]))
            await hot.flush()
            assert all(f.done() and not f.exception() for f in sent)
            delivered = [f.result() for f in sent]
            assert all(isinstance(d, Delivered) and d.offset >= 0 for d in delivered)
            for key, d in zip(keys, delivered, strict=False):  # Java's murmur2, as aiokafka
                expected = await (await reference.send(topic, b"ref", key=key))
                assert d.partition == expected.partition, key
        finally:
            await reference.stop()
            await hot.close()
        records = await read_records(pipeline, topic)
        values = {r.value for r in records}
        assert {b"hot-" + key for key in keys} <= values
        assert b"with headers" in values

    asyncio.run(scenario())


def test_a_record_the_broker_cannot_take_fails_its_send(pipeline: Settings) -> None:
    async def scenario() -> None:
        topic = await new_topic(pipeline, "test-hot", 1)
        hot = HotProducer(librdkafka_config(pipeline.kafka.servers, "test-hot", 1.0))
        try:
            with pytest.raises(DeliveryFailed):  # over message.max.bytes: refused at once
                await hot.send(topic, b"k", b"x" * (2 << 20))
            # To a partition that does not exist: the delivery future fails.
            future = await hot.send(topic, b"k", b"v", partition=7)
            await hot.flush()
            assert isinstance(future.exception(), DeliveryFailed)
            ok = await hot.send(topic, b"k", b"still works")
            await hot.flush()
            assert ok.result().offset >= 0
        finally:
            await hot.close()

    asyncio.run(scenario())


def test_the_deployments_security_becomes_librdkafka_settings() -> None:
    assert KafkaSettings().librdkafka_security() == {}
    sasl = KafkaSettings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="kefu",
        sasl_password=SecretStr("s3cret"),
        ssl_cafile="/etc/kafka/ca.pem",
        ssl_check_hostname=False,
    ).librdkafka_security()
    assert sasl == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "kefu",
        "sasl.password": "s3cret",
        "ssl.endpoint.identification.algorithm": "none",
        "ssl.ca.location": "/etc/kafka/ca.pem",
    }
    config = librdkafka_config("127.0.0.1:1", "c", 2.0, sasl)
    assert config["partitioner"] == "murmur2_random" and config["enable.idempotence"] is True
    assert config["sasl.username"] == "kefu"
