"""Topic names: the contract between processes. Every conversation topic is keyed by
conversation id, so one partition holds a conversation's whole history in order."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TopicNames:
    prefix: str = "kefu"

    @property
    def commands(self) -> str:
        return f"{self.prefix}.commands"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}.deadletter"

    @property
    def routing(self) -> str:
        """Routing commands, keyed by queue (tenant:team): one router per queue."""
        return f"{self.prefix}.routing"

    @property
    def queue_events(self) -> str:
        """The queues' own history (presence, line, assignments), keyed by queue."""
        return f"{self.prefix}.queue-events"

    @property
    def control(self) -> str:
        """Moderation word lists, compacted, keyed tenant/category: every worker reads
        all of it, from the beginning (see streams.wordlists)."""
        return f"{self.prefix}.control.wordlists"

    @property
    def audit_checkpoints(self) -> str:
        """Signed heads of conversations' keyed audit chains, kept forever."""
        return f"{self.prefix}.audit-checkpoints"

    @property
    def keys(self) -> str:
        """Customers' data keys (crypto-shredding, connectors.keystore), compacted,
        keyed by key id; erasing a customer writes tombstones. Every process that
        reads or writes personal fields reads all of it."""
        return f"{self.prefix}.control.keys"

    @property
    def config(self) -> str:
        """Tenants' configuration (schemas.config), compacted, keyed
        tenant/kind/entity: every process reads all of it, from the beginning."""
        return f"{self.prefix}.control.config"


# Faust's tables (streams.app) and the internal topics Faust derives from the app id.
# kefu creates them itself, ahead of the workers (kefu.topics): a changelog Faust
# creates while the worker subscribes can be missing from the consumer's first
# metadata, and the table is then left without changelog partitions.
TABLES = ("conversations", "queues")


def changelog_topic(app_id: str, table: str) -> str:
    return f"{app_id}-{table}-changelog"


def leader_topic(app_id: str) -> str:
    """Faust's LeaderAssignor topic (one partition)."""
    return f"{app_id}-__assignor-__leader"
