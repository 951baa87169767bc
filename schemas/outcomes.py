"""Value types exchanged between the stream agents and the I/O they are given."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    status: str  # delivered | failed
    attempts: int
    detail: str = ""
