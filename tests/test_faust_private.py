"""streams.faust_private: the one module that touches Faust's and aiokafka's private
names. The version check passes on the pinned versions and refuses others by name;
every declared private name exists on today's classes with its expected shape; and
Faust's private entry points reach the public hooks kefu overrides."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import faust
import pytest
from faust.tables.recovery import Recovery as FaustRecovery
from faust.transport.consumer import Consumer as FaustConsumer
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from schemas.topics import TopicNames
from streams import faust_private
from streams.app import StreamsConfig, build_app
from streams.consumer import Consumer
from streams.recovery import Recovery

COMMANDS = TP("kefu.commands", 3)
TESTED = {dist: min(versions) for dist, versions in faust_private.TESTED_VERSIONS.items()}


# --- versions -------------------------------------------------------------------------


def test_the_installed_versions_are_the_tested_ones() -> None:
    installed = faust_private.installed_versions()
    assert installed == {
        "faust-streaming": "0.15.3",
        "aiokafka": "0.14.0",
        "mode-streaming": "0.7.1",
    }
    assert faust_private.version_problems(installed) == []
    faust_private.check_versions()
    faust_private.check_versions(installed)


def test_another_faust_version_refuses_to_start_and_says_why() -> None:
    with pytest.raises(RuntimeError) as raised:
        faust_private.check_versions({**TESTED, "faust-streaming": "0.16.0"})
    message = str(raised.value)
    assert "faust-streaming: 0.16.0 is installed, tested: 0.15.3" in message
    assert "streams/faust_private.py" in message and "TESTED_VERSIONS" in message
    assert "aiokafka:" not in message  # only what is wrong is listed


def test_every_untested_or_missing_distribution_is_named() -> None:
    with pytest.raises(RuntimeError) as raised:
        faust_private.check_versions({"faust-streaming": "0.15.3", "aiokafka": "0.13.0"})
    message = str(raised.value)
    assert "aiokafka: 0.13.0 is installed, tested: 0.14.0" in message
    assert "mode-streaming: not installed, tested: 0.7.1" in message
    assert "faust-streaming:" not in message


# --- the declared private names -----------------------------------------------------


def test_the_declared_private_names_exist_on_todays_classes() -> None:
    assert faust_private.private_api_problems() == []


@pytest.mark.parametrize("declared", faust_private.PRIVATE_METHODS, ids=lambda m: m.name)
def test_each_declared_private_method_has_the_shape_we_override(
    declared: faust_private.PrivateMethod,
) -> None:
    assert (
        faust_private._method_problem(
            declared.owner, declared.name, declared.params, declared.is_async
        )
        is None
    )
    if declared.hooked_by is not None:  # our override is the one Faust calls
        assert declared.name in vars(declared.hooked_by)


def test_a_private_method_faust_dropped_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(FaustConsumer, "_add_gap")  # as if a release renamed it
    with pytest.raises(RuntimeError) as raised:
        faust_private.check_versions(faust_private.installed_versions())
    assert "faust.transport.consumer.Consumer._add_gap is missing" in str(raised.value)
    assert "HookedConsumer.record_gap" in str(raised.value)  # what depends on it


def test_a_changed_signature_or_a_missing_attribute_is_reported() -> None:
    class Changed:
        offsets: dict[TP, int]

        def _new_offset(self, tp: TP, generation: int) -> int | None:
            return None

        async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
            pass

    problems = faust_private.private_api_problems(
        [
            faust_private.PrivateMethod(Changed, "_new_offset", ("tp",), False, "a"),
            faust_private.PrivateMethod(Changed, "_add_gap", ("tp", "start", "end"), True, "b"),
        ],
        [
            faust_private.PrivateAttribute(Changed, "_committed_offset", "c"),
            faust_private.PrivateAttribute(Changed, "offsets", "d"),
            faust_private.PrivateAttribute(Changed, "_client", "e", ("_new_offset",)),
        ],
    )
    assert len(problems) == 4
    assert "Changed._new_offset(tp, generation): expected (tp) [a]" in problems[0]
    assert "Changed._add_gap(tp, offset_from, offset_to): expected (tp, start, end)" in problems[1]
    assert "Changed._committed_offset is not declared [c]" in problems[2]
    assert "Changed._client is not used in _new_offset [e]" in problems[3]


# --- the hooks, as Faust calls them ---------------------------------------------------


@pytest.fixture
def consumer(tmp_path: Path) -> Iterator[Consumer]:
    kefu = build_app(
        StreamsConfig(
            app_id="test-faust-private",
            broker="127.0.0.1:9",  # never connected
            partitions=4,
            datadir=tmp_path,
            topics=TopicNames(""),
            web_enabled=False,
            fetch_max_wait_ms=123,
            fetch_min_bytes=456,
        )
    )
    consumer = kefu.app.consumer
    assert isinstance(consumer, Consumer)
    yield consumer


async def test_faust_private_consumer_methods_reach_the_hooks(
    consumer: Consumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, ...]] = []

    async def record_gap(tp: TP, offset_from: int, offset_to: int) -> None:
        calls.append(("gap", tp, offset_from, offset_to))

    async def commit_partitions(tps: Any, start_new_transaction: bool) -> bool:
        calls.append(("commit", tuple(tps), start_new_transaction))
        return True

    monkeypatch.setattr(consumer, "next_commit_offset", lambda tp: 77)
    monkeypatch.setattr(consumer, "record_gap", record_gap)
    monkeypatch.setattr(consumer, "commit_partitions", commit_partitions)
    faust_consumer = cast(Any, consumer)  # Faust's own calls, by their private names
    assert faust_consumer._new_offset(COMMANDS) == 77
    await faust_consumer._add_gap(COMMANDS, 5, 9)
    assert await faust_consumer._commit_tps([COMMANDS], False) is True
    assert calls == [("gap", COMMANDS, 5, 9), ("commit", (COMMANDS,), False)]


def test_the_accessors_return_fausts_live_bookkeeping(consumer: Consumer) -> None:
    faust_consumer = cast(Any, consumer)
    assert faust_private.committed_offsets(consumer) is faust_consumer._committed_offset
    assert faust_private.read_offsets(consumer) is faust_consumer._read_offset
    assert faust_private.acked(consumer) is faust_consumer._acked
    assert faust_private.acked_index(consumer) is faust_consumer._acked_index
    assert faust_private.gaps(consumer) is faust_consumer._gap
    assert faust_private.unacked_messages(consumer) is faust_consumer._unacked_messages
    assert isinstance(faust_private.consumer_thread(consumer), faust_private.HookedConsumerThread)


async def test_the_worker_client_fetches_with_the_apps_wait(consumer: Consumer) -> None:
    thread = faust_private.consumer_thread(consumer)
    client = thread._create_worker_consumer(cast(Any, consumer.transport))  # as Faust does
    try:
        # Faust hard-codes 1,500 ms; the app's settings win (read when the client starts).
        assert (client._fetch_max_wait_ms, client._fetch_min_bytes) == (123, 456)
    finally:
        await client.stop()


async def test_the_recoverys_private_seek_reaches_the_hook() -> None:
    sought: list[tuple[Any, ...]] = []

    class Seeking(Recovery):
        async def seek_offsets(
            self, consumer: Any, tps: set[TP], offsets: Counter[TP], title: str
        ) -> None:
            sought.append((tps, dict(offsets), title))

    recovery = Seeking.__new__(Seeking)
    await cast(Any, recovery)._seek_offsets(None, {COMMANDS}, Counter({COMMANDS: 4}), "active")
    assert sought == [({COMMANDS}, {COMMANDS: 4}, "active")]
    # Faust's recovery state, read through the accessors.
    recovery._recovery_started_at = 12.5
    recovery._active_events_received_at = {COMMANDS: 13.0}
    assert faust_private.recovery_started_at(recovery) == 12.5
    assert faust_private.active_events_received_at(recovery) == {COMMANDS: 13.0}
    assert issubclass(Recovery, FaustRecovery)


def test_our_own_private_names_on_faust_subclasses_shadow_nothing_of_faust() -> None:
    # A Faust release adding one of these names would see it replaced, silently.
    for cls, instance_attributes in ((Consumer, {"_holes"}), (Recovery, set())):
        faust_base = cls.__mro__[2]  # past the Hooked class
        assert faust_base.__module__.startswith("faust.")
        methods = {n for n in vars(cls) if n.startswith("_") and not n.startswith("__")}
        for name in (methods - {"_abc_impl"}) | instance_attributes:
            assert not hasattr(faust_base, name), f"{faust_base.__name__}.{name}"
            assert not faust_private._annotated(faust_base, name), f"{faust_base.__name__}.{name}"


def test_a_hooked_app_builds_its_transport_class(tmp_path: Path) -> None:
    class Transport(faust_aiokafka.Transport):
        pass

    class App(faust_private.HookedApp):
        transport_class = Transport

    app = App("test-hooked-app", broker="kafka://127.0.0.1:9", datadir=str(tmp_path))
    assert isinstance(app.transport, Transport)
    assert isinstance(app, faust.App)


async def test_topic_partitions_reads_the_whole_clusters_metadata() -> None:
    class Cluster:
        def partitions_for_topic(self, topic: str) -> set[int] | None:
            return {0, 1, 2} if topic == "kefu.events" else None

    class Client:
        async def fetch_all_metadata(self) -> Cluster:
            return Cluster()

    class AIOKafkaConsumer:  # the part of aiokafka's consumer it uses
        _client = Client()

    consumer = cast(Any, AIOKafkaConsumer())
    assert await faust_private.topic_partitions(consumer, "kefu.events") == {0, 1, 2}
    assert await faust_private.topic_partitions(consumer, "nope") == set()
