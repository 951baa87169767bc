"""Every use of a private (underscore) name of faust-streaming and aiokafka, in one place.

Project rule: a dependency's private API lives in one module, with a version check.
Faust's public API cannot express what kefu needs from its consumer (commits that never
move over an unprocessed record, hole repair, the broker fetch wait, table recovery's
seeks: ``streams.consumer``, ``streams.recovery``), so kefu reads Faust's offset
bookkeeping and overrides some of its private methods. Those names can change in any
release without notice; here they are declared, typed and checked.

What is here:

- ``check_versions()``: call it when the app is built. It raises ``RuntimeError``
  naming every problem when the installed faust-streaming, aiokafka or mode-streaming
  is not a version this module was tested against (``TESTED_VERSIONS``), or when one of
  the declared private names (``PRIVATE_METHODS``, ``PRIVATE_ATTRIBUTES``) is missing or
  has another signature. A Faust upgrade fails at start, not by losing records.
- Accessors (``committed_offsets(consumer)``, ``read_offsets(consumer)``, ...): typed
  functions over Faust's and aiokafka's private state. They return Faust's live
  objects (no copies: callers mutate them, as the offset bookkeeping must).
- Hooked base classes (``HookedConsumer``, ``HookedRecovery``, ``HookedTableManager``,
  ``HookedApp``): Faust subclasses whose only job is to turn the private methods kefu
  overrides into public, typed, documented hooks (``next_commit_offset`` for
  ``_new_offset``, ...). Each hook's default is Faust's own behaviour.

Why hooks rather than moving kefu's subclasses here: the policy (strict commits, hole
repair, stalled-recovery repair) is kefu's and belongs with its docs and tests in
``streams.consumer`` and ``streams.recovery``; moving it here would bury it among
Faust's internals. Leaving the overrides in those modules, on the other hand, would
spread Faust's private names over five files again. The hook classes do the
minimum: one forwarding call per override, never per record (``_new_offset`` runs per
partition per commit, ``_add_gap`` per skipped range, ``_commit_tps`` per commit). So
``streams.consumer.Consumer`` subclasses ``HookedConsumer`` and overrides public hook
names only, and no other module touches a Faust or aiokafka private name.

Not covered (outside this module's reach or not private):
- ``faust.App._new_transport`` is still overridden in ``streams/app.py``; it is
  declared and checked here, and ``HookedApp`` is its hook (``transport_class``).
- ``projections/`` may not import ``streams`` (the layering rule), so its aiokafka
  metadata look-ups cannot use ``topic_partitions``.
- Faust's changelog naming (``schemas.topics.changelog_topic``, ``leader_topic``) is
  mirrored, not called; ``tests/test_topics.py`` compares it with Faust's.

No mode-streaming private name is used; mode is checked because the consumer thread and
the recovery service kefu hooks into run on its ``Service`` machinery, and
faust-streaming accepts any ``mode-streaming>=0.6.0``.

No override switch (environment or setting) lets a worker start with other versions:
the versions are pinned in ``pyproject.toml``, so an upgrade is a code change anyway,
and running these hooks against an unchecked Faust risks committing offsets over
records nobody processed. To accept a new version: review every declared name against
the release's source, run ``tests/test_faust_private.py``, ``tests/test_consumer.py``,
``tests/test_recovery.py``, ``tests/test_metrics.py`` and the fault tests, then add the
version to ``TESTED_VERSIONS``.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, MutableMapping, MutableSet
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import faust
from aiokafka import AIOKafkaConsumer
from aiokafka.client import AIOKafkaClient
from faust.tables.manager import TableManager as FaustTableManager
from faust.tables.recovery import Recovery as FaustRecovery
from faust.transport.consumer import Consumer as FaustConsumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, ConsumerT, Message, TransportT

log = logging.getLogger(__name__)

# --- versions -------------------------------------------------------------------------

#: Distribution name -> the versions the private names below were written and tested
#: against. Keep in step with the pins in pyproject.toml.
TESTED_VERSIONS: Final[Mapping[str, frozenset[str]]] = {
    "faust-streaming": frozenset({"0.15.3"}),
    "aiokafka": frozenset({"0.14.0"}),
    "mode-streaming": frozenset({"0.7.1"}),
}


@dataclass(frozen=True, slots=True)
class PrivateMethod:
    """A private method kefu calls or overrides (or a method of a private object): it
    must exist on ``owner`` with these parameter names (after ``self``) and be a
    coroutine function iff ``is_async``. ``hooked_by``: the class here that overrides
    it, checked against the same shape."""

    owner: type
    name: str
    params: tuple[str, ...]
    is_async: bool
    used_for: str
    hooked_by: type | None = None


@dataclass(frozen=True, slots=True)
class PrivateAttribute:
    """A private attribute kefu reads or writes. Declared when ``owner`` (or a base)
    annotates it (Faust is typed) or, for an untyped library, when every function named
    in ``set_or_read_in`` mentions it in its code."""

    owner: type
    name: str
    used_for: str
    set_or_read_in: tuple[str, ...] = ()


PRIVATE_ATTRIBUTES: Final[tuple[PrivateAttribute, ...]] = (
    PrivateAttribute(FaustConsumer, "_acked", "acked(): strict commits"),
    PrivateAttribute(FaustConsumer, "_acked_index", "acked_index(): strict commits"),
    PrivateAttribute(FaustConsumer, "_gap", "gaps(): transaction markers"),
    PrivateAttribute(FaustConsumer, "_committed_offset", "committed_offsets(): commits, lag"),
    PrivateAttribute(FaustConsumer, "_read_offset", "read_offsets(): seeks, lag"),
    PrivateAttribute(FaustConsumer, "_unacked_messages", "unacked_messages(): hole repair"),
    PrivateAttribute(faust_aiokafka.Consumer, "_thread", "consumer_thread(): seeks"),
    PrivateAttribute(FaustRecovery, "_recovery_started_at", "recovery_started_at()"),
    PrivateAttribute(FaustRecovery, "_active_events_received_at", "active_events_received_at()"),
    PrivateAttribute(FaustTableManager, "_recovery", "HookedTableManager.recovery"),
    PrivateAttribute(AIOKafkaConsumer, "_client", "topic_partitions()", ("__init__",)),
    # Set after construction, read when start() builds the fetcher.
    PrivateAttribute(
        AIOKafkaConsumer, "_fetch_max_wait_ms", "set_fetch_wait()", ("__init__", "start")
    ),
    PrivateAttribute(
        AIOKafkaConsumer, "_fetch_min_bytes", "set_fetch_wait()", ("__init__", "start")
    ),
)

# --- hooks: Faust's private methods as public ones ---------------------------------


class HookedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread, handing each worker client it builds to
    ``HookedConsumer.worker_client_created`` before the client starts."""

    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> AIOKafkaConsumer:
        client = super()._create_worker_consumer(transport)
        consumer = self.consumer
        if isinstance(consumer, HookedConsumer):
            consumer.worker_client_created(client)
        return client


class HookedConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer with the private methods kefu overrides turned into
    public hooks. Each default is Faust's behaviour; override the hook, not the private
    name, and call ``super()`` for Faust's."""

    def next_commit_offset(self, tp: TP) -> int | None:
        """The offset to commit for ``tp`` now (the next record to read), or ``None``
        to leave it: Faust's ``_new_offset``, called per partition on every commit."""
        return super()._new_offset(tp)

    async def record_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        """The fetch loop saw offsets ``offset_from``..``offset_to - 1`` missing (no
        record there): Faust's ``_add_gap`` counts them as processed."""
        await super()._add_gap(tp, offset_from, offset_to)

    async def commit_partitions(self, tps: Iterable[TP], start_new_transaction: bool) -> bool:
        """Commit what is committable of ``tps``: Faust's ``_commit_tps``."""
        return bool(await super()._commit_tps(tps, start_new_transaction))

    def worker_client_created(self, client: AIOKafkaConsumer) -> None:
        """The aiokafka consumer of this worker was built and is not started yet."""

    # The private names, wired to the hooks (declared in PRIVATE_METHODS).

    def _new_offset(self, tp: TP) -> int | None:
        return self.next_commit_offset(tp)

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        await self.record_gap(tp, offset_from, offset_to)

    async def _commit_tps(self, tps: Iterable[TP], start_new_transaction: bool) -> bool:
        return await self.commit_partitions(tps, start_new_transaction)

    def _new_consumer_thread(self) -> HookedConsumerThread:
        return HookedConsumerThread(self, loop=self.loop, beacon=self.beacon)


class HookedRecovery(FaustRecovery):
    """Faust's table recovery with its private seek as a public hook."""

    async def seek_offsets(
        self, consumer: ConsumerT, tps: set[TP], offsets: Counter[TP], title: str
    ) -> None:
        """Seek ``tps`` to ``offsets`` (``-1``: the beginning) before reading a changelog
        (``title``: "active" or "standby"): Faust's ``_seek_offsets``."""
        await super()._seek_offsets(consumer, tps, offsets, title)

    async def _seek_offsets(
        self, consumer: ConsumerT, tps: set[TP], offsets: Counter[TP], title: str
    ) -> None:
        await self.seek_offsets(consumer, tps, offsets, title)


class HookedTableManager(FaustTableManager):
    """Faust's table manager, recovering with ``recovery_class`` (Faust hard-codes its
    own ``Recovery``)."""

    recovery_class: ClassVar[type[FaustRecovery]] = FaustRecovery

    @property
    def recovery(self) -> FaustRecovery:
        if self._recovery is None:
            self._recovery = self.recovery_class(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery


class HookedApp(faust.App):
    """A Faust app whose consumer transport is ``transport_class`` whatever the broker
    URL's scheme (Faust picks it from the URL)."""

    transport_class: ClassVar[type[faust_aiokafka.Transport]] = faust_aiokafka.Transport

    def _new_transport(self) -> TransportT:
        return self.transport_class(self.conf.broker_consumer, self)


PRIVATE_METHODS: Final[tuple[PrivateMethod, ...]] = (
    PrivateMethod(
        FaustConsumer,
        "_new_offset",
        ("tp",),
        False,
        "HookedConsumer.next_commit_offset (streams.consumer: strict commits)",
        HookedConsumer,
    ),
    PrivateMethod(
        FaustConsumer,
        "_add_gap",
        ("tp", "offset_from", "offset_to"),
        True,
        "HookedConsumer.record_gap (streams.consumer: skipped offsets)",
        HookedConsumer,
    ),
    PrivateMethod(
        FaustConsumer,
        "_commit_tps",
        ("tps", "start_new_transaction"),
        True,
        "HookedConsumer.commit_partitions (streams.consumer: hole repair)",
        HookedConsumer,
    ),
    PrivateMethod(
        FaustConsumer, "_is_changelog_tp", ("tp",), False, "is_changelog_tp() (streams.consumer)"
    ),
    PrivateMethod(
        faust_aiokafka.Consumer,
        "_new_consumer_thread",
        (),
        False,
        "HookedConsumer: builds HookedConsumerThread",
        HookedConsumer,
    ),
    PrivateMethod(
        faust_aiokafka.AIOKafkaConsumerThread,
        "_create_worker_consumer",
        ("transport",),
        False,
        "HookedConsumer.worker_client_created (streams.consumer: fetch wait)",
        HookedConsumerThread,
    ),
    PrivateMethod(
        FaustRecovery,
        "_seek_offsets",
        ("consumer", "tps", "offsets", "title"),
        True,
        "HookedRecovery.seek_offsets (streams.recovery: seek to None)",
        HookedRecovery,
    ),
    PrivateMethod(
        faust.App,
        "_new_transport",
        (),
        False,
        "HookedApp.transport_class; streams.app._App overrides it directly",
        HookedApp,
    ),
    PrivateMethod(AIOKafkaClient, "fetch_all_metadata", (), True, "topic_partitions()"),
)

# --- accessors: Faust's consumer --------------------------------------------------------


def committed_offsets(consumer: FaustConsumer) -> MutableMapping[TP, int | None]:
    """Per partition, the last committed offset (the next record to read), ``None``
    while unknown. Faust's live mapping (a defaultdict)."""
    return consumer._committed_offset


def read_offsets(consumer: FaustConsumer) -> MutableMapping[TP, int | None]:
    """Per partition, the offset of the last record the fetch loop passed on; the loop
    drops records at or below it. Faust's live mapping (a defaultdict)."""
    return consumer._read_offset


def acked(consumer: FaustConsumer) -> MutableMapping[TP, list[int]]:
    """Per partition, the acked offsets not committed yet (unsorted)."""
    return consumer._acked


def acked_index(consumer: FaustConsumer) -> MutableMapping[TP, set[int]]:
    """Per partition, the same offsets as ``acked`` as a set (Faust's duplicate check)."""
    return consumer._acked_index


def gaps(consumer: FaustConsumer) -> MutableMapping[TP, Any]:
    """Per partition, an ``intervaltree.IntervalTree`` of offsets known to hold no
    record (transaction markers)."""
    return consumer._gap


def unacked_messages(consumer: FaustConsumer) -> MutableSet[Message]:
    """The messages handed to agents and not acked yet (a ``WeakSet``)."""
    return consumer._unacked_messages


def is_changelog_tp(consumer: FaustConsumer, tp: TP) -> bool:
    """Whether ``tp`` is a partition of a table's changelog topic."""
    return bool(consumer._is_changelog_tp(tp))


def consumer_thread(consumer: faust_aiokafka.Consumer) -> faust_aiokafka.AIOKafkaConsumerThread:
    """The thread that owns the consumer's aiokafka client."""
    return consumer._thread


async def seek_to_beginning(consumer: faust_aiokafka.Consumer, tps: Iterable[TP]) -> None:
    """Seek the aiokafka client's partitions ``tps`` to their beginning (Faust's
    consumer has no public way to)."""
    await consumer._thread.seek_to_beginning(*map(faust_aiokafka.ensure_aiokafka_TP, tps))


# --- accessors: Faust's table recovery ----------------------------------------------------


def recovery_started_at(recovery: FaustRecovery) -> float | None:
    """``time.monotonic()`` when the current recovery started, ``None`` before one."""
    return recovery._recovery_started_at


def active_events_received_at(recovery: FaustRecovery) -> MutableMapping[TP, float]:
    """Per active changelog partition, ``time.monotonic()`` of its last record in this
    recovery. Faust's live mapping."""
    return recovery._active_events_received_at


# --- accessors: aiokafka ------------------------------------------------------------------


def set_fetch_wait(client: AIOKafkaConsumer, max_wait_ms: int, min_bytes: int) -> None:
    """The broker fetch's wait and minimum size for an aiokafka consumer built by
    someone else (Faust hard-codes 1,500 ms). Only before ``client.start()``: the
    fetcher reads them once, when it is built."""
    client._fetch_max_wait_ms = max_wait_ms
    client._fetch_min_bytes = min_bytes


async def topic_partitions(client: AIOKafkaConsumer, topic: str) -> set[int]:
    """The partitions of ``topic`` from a fresh fetch of the whole cluster's metadata
    (the client's own view only knows subscribed or assigned topics); empty if the
    topic does not exist."""
    cluster = await client._client.fetch_all_metadata()
    return set(cluster.partitions_for_topic(topic) or ())


# --- the check ----------------------------------------------------------------------------


def installed_versions() -> dict[str, str | None]:
    """The installed version of each distribution in ``TESTED_VERSIONS`` (``None``:
    not installed)."""
    out: dict[str, str | None] = {}
    for dist in TESTED_VERSIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def version_problems(installed: Mapping[str, str | None]) -> list[str]:
    problems = []
    for dist, tested in TESTED_VERSIONS.items():
        version = installed.get(dist)
        if version not in tested:
            found = "not installed" if version is None else f"{version} is installed"
            problems.append(f"{dist}: {found}, tested: {', '.join(sorted(tested))}")
    return problems


def _qualname(owner: type, name: str) -> str:
    return f"{owner.__module__}.{owner.__qualname__}.{name}"


def _method_problem(owner: type, name: str, params: tuple[str, ...], is_async: bool) -> str | None:
    where = _qualname(owner, name)
    method = getattr(owner, name, None)
    if not callable(method):
        return f"{where} is missing"
    try:
        found = tuple(inspect.signature(method).parameters)[1:]  # after self
    except (TypeError, ValueError):
        return f"{where} has no signature"
    if found != params:
        return f"{where}({', '.join(found)}): expected ({', '.join(params)})"
    if inspect.iscoroutinefunction(method) != is_async:
        return f"{where} is {'not ' if is_async else ''}a coroutine function any more"
    return None


def _annotated(owner: type, name: str) -> bool:
    return any(name in vars(klass).get("__annotations__", {}) for klass in owner.__mro__)


def _mentioned_in(function: Callable[..., Any] | None, name: str) -> bool:
    code = getattr(function, "__code__", None)
    return code is not None and name in code.co_names


def private_api_problems(
    methods: Iterable[PrivateMethod] = PRIVATE_METHODS,
    attributes: Iterable[PrivateAttribute] = PRIVATE_ATTRIBUTES,
) -> list[str]:
    """What is missing or changed of the declared private names (empty: all there)."""
    problems = []
    for m in methods:
        problem = _method_problem(m.owner, m.name, m.params, m.is_async)
        if problem is None and m.hooked_by is not None:
            problem = _method_problem(m.hooked_by, m.name, m.params, m.is_async)
        if problem is not None:
            problems.append(f"{problem} [{m.used_for}]")
    for a in attributes:
        if a.set_or_read_in:
            found = all(_mentioned_in(getattr(a.owner, f, None), a.name) for f in a.set_or_read_in)
            missing = f"is not used in {', '.join(a.set_or_read_in)}"
        else:
            found = _annotated(a.owner, a.name)
            missing = "is not declared"
        if not found:
            problems.append(f"{_qualname(a.owner, a.name)} {missing} [{a.used_for}]")
    return problems


_checked = False


def check_versions(installed: Mapping[str, str | None] | None = None) -> None:
    """Raise ``RuntimeError`` (every problem in one message) unless the installed
    faust-streaming, aiokafka and mode-streaming are tested versions and every declared
    private name is there with its expected shape. Call it when the app is built;
    ``installed`` (distribution -> version) replaces the installed versions (tests).
    Checked once per process: later calls without ``installed`` return at once."""
    global _checked
    if installed is None and _checked:
        return
    versions = installed_versions() if installed is None else installed
    problems = version_problems(versions) + private_api_problems()
    if problems:
        tested = ", ".join(f"{d} {'/'.join(sorted(v))}" for d, v in TESTED_VERSIONS.items())
        raise RuntimeError(
            "kefu uses private APIs of Faust and aiokafka (streams/faust_private.py), "
            f"written and tested against {tested}; refusing to start:\n- "
            + "\n- ".join(problems)
            + "\nInstall the pinned versions (pyproject.toml), or review the names in "
            "streams/faust_private.py against the new release, run its tests and add the "
            "version to TESTED_VERSIONS."
        )
    if installed is None:
        _checked = True
        log.debug("private APIs checked: %s", versions)
