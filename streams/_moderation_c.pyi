"""Types of the C extension built from streams/_native/moderation.c."""

from collections.abc import Callable, Mapping, Sequence

from streams.moderation import Verdict

TABLE_SIZE: int
DROP: int
F_WORD: int
F_DIGIT: int
F_ASCII_DIGIT: int
F_HINT: int
E_LEFT: int
E_RIGHT: int
E_LETTERS: int

# (accepted spans (category, start, end) on the original text or None,
#  personal data possible, spam)
Found = tuple[list[tuple[str, int, int]] | None, bool, bool]

class Automaton:
    states: int
    categories: tuple[str, ...]
    def __init__(
        self,
        patterns: Sequence[str],
        entries: Sequence[Sequence[tuple[int, int]]],
        categories: tuple[str, ...],
    ) -> None: ...
    def find(self, text: str) -> list[tuple[int, int, int]]: ...

class Scanner:
    def __init__(
        self,
        matchers: tuple[tuple[Automaton, bytes, bytes], ...],
        actions: tuple[str, ...],
        norm: bytes,
        flags: bytes,
        verdict: type[Verdict],
        version: int,
        personal: bool,
        spam: bool,
        limits: tuple[int, int, int, int],
        on_found: Callable[[str, list[tuple[str, int, int]] | None, bool, bool], Verdict],
    ) -> None: ...
    def scan(
        self, text: str, recent: Sequence[tuple[int, int, int]] | None, now: int
    ) -> Verdict | Found: ...

class Dispatch:
    def __init__(self, shared: Scanner, tenants: Mapping[str, Scanner]) -> None: ...
    def update(self, shared: Scanner, tenants: Mapping[str, Scanner]) -> None: ...
    def __call__(
        self,
        text: str,
        tenant_id: str = "",
        *,
        recent: Sequence[tuple[int, int, int]] | None = None,
        now: int = 0,
    ) -> Verdict: ...

def sender_stats(text: str, norm: bytes) -> tuple[int, int]: ...
