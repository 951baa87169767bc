"""Publishes commands to Kafka, keyed by conversation id.

``publish`` returns once the broker has the record (acks=all, idempotent producer):
an edge answers "accepted" only for what is durable."""

from __future__ import annotations

from aiokafka import AIOKafkaProducer

from schemas.codec import CODEC
from schemas.records import Command, RoutingCommand


class CommandPublisher:
    def __init__(self, bootstrap: str, topic: str, routing_topic: str = "") -> None:
        self._topic = topic
        self._routing_topic = routing_topic
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            client_id="kefu-gateway",
        )

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def publish_routing(self, command: RoutingCommand) -> None:
        """Routing commands are keyed by queue: one router decides per queue."""
        await self._producer.send_and_wait(
            self._routing_topic, key=command.queue.encode(), value=CODEC.encode(command)
        )

    async def publish(self, command: Command) -> None:
        await self._producer.send_and_wait(
            self._topic,
            key=command.conversation_id.encode(),
            value=CODEC.encode(command),
        )
