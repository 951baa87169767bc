"""Publishes commands to Kafka, keyed by conversation id.

``publish`` returns once the broker has the record (acks=all, idempotent producer):
an edge answers "accepted" only for what is durable."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiokafka import AIOKafkaProducer

from connectors.config_log import publish_config
from connectors.metrics import publishing
from schemas.codec import CODEC
from schemas.headers import with_tenant
from schemas.records import Command, ConfigChanged, RoutingCommand


class CommandPublisher:
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        routing_topic: str = "",
        kafka_options: Mapping[str, Any] | None = None,  # SASL/TLS (docs/security.md)
        config_topic: str = "",
    ) -> None:
        self._topic = topic
        self._routing_topic = routing_topic
        self._config_topic = config_topic
        self.started = False  # the gateway's /readyz
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            client_id="kefu-gateway",
            **(kafka_options or {}),
        )

    async def start(self) -> None:
        await self._producer.start()
        self.started = True

    async def stop(self) -> None:
        self.started = False
        await self._producer.stop()

    async def publish_routing(self, command: RoutingCommand) -> None:
        """Routing commands are keyed by queue: one router decides per queue."""
        with publishing(command, self._routing_topic) as headers:
            await self._producer.send_and_wait(
                self._routing_topic,
                key=command.queue.encode(),
                value=CODEC.encode(command),
                headers=with_tenant(headers, command.tenant_id),
            )

    async def publish_config(self, record: ConfigChanged) -> None:
        """An entity's new state on the config topic (``connectors/config_log.py``)."""
        await publish_config(self._producer, self._config_topic, record)

    async def publish(self, command: Command) -> None:
        with publishing(command, self._topic) as headers:
            await self._producer.send_and_wait(
                self._topic,
                key=command.conversation_id.encode(),
                value=CODEC.encode(command),
                headers=with_tenant(headers, command.tenant_id),
            )
