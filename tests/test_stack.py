"""The embedded stack and its process supervision, against real processes.

The stack test runs its own Kafka and Redis on free ports in a temporary state dir, so
it never meets a stack a developer has running.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import (  # type: ignore[import-untyped, unused-ignore]
    AIOKafkaConsumer,
    AIOKafkaProducer,
    TopicPartition,
)
from aiokafka.admin import (  # type: ignore[import-untyped, unused-ignore]
    AIOKafkaAdminClient,
    NewTopic,
)

from kefu.processes import (
    LOOPBACK,
    Daemon,
    NotReadyError,
    ProcessError,
    free_port,
    free_ports,
    port_open,
    wait_until,
)
from kefu.settings import KafkaSettings, RedisSettings, Settings
from kefu.stack import Stack, StackError

TOPIC = "kefu.test-stack"


def _exists(pid: int) -> bool:
    """Whether the process runs (a zombie, with its empty command line, does not)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes() != b""
    except OSError:
        return False


def _python_daemon(tmp_path: Path, code: str, name: str = "sleeper") -> Daemon:
    # The marker is the script's path: unique to this test's tmp dir.
    script = tmp_path / f"{name}.py"
    script.write_text(code)
    return Daemon(name=name, argv=[sys.executable, str(script)], run_dir=tmp_path / "run")


# ------------------------------------------------------------------ processes


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    port = free_port()
    with socket.socket() as sock:
        sock.bind((LOOPBACK, port))
        sock.listen()
        assert port_open(port)


def test_daemon_start_is_idempotent_and_stop_removes_pid_file(tmp_path: Path) -> None:
    daemon = _python_daemon(tmp_path, "import time\nprint('ready', flush=True)\ntime.sleep(120)\n")
    pid = daemon.start()
    try:
        assert daemon.pid() == pid
        assert daemon.pid_path.read_text().strip() == str(pid)
        assert daemon.start() == pid  # already running: not a second copy
        daemon.wait_ready(lambda: "ready" in daemon.log.read_text(), timeout=10)
        assert os.getsid(pid) == pid  # detached: leads its own session
    finally:
        assert daemon.stop(timeout=10) == pid
    assert not _exists(pid)
    assert not daemon.pid_path.exists()
    assert daemon.pid() is None
    assert daemon.stop() is None


def test_concurrent_starts_make_one_daemon(tmp_path: Path) -> None:
    code = "import time\ntime.sleep(120)\n"
    daemons = [_python_daemon(tmp_path, code) for _ in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        pids = set(pool.map(Daemon.start, daemons))
    try:
        assert len(pids) == 1
    finally:
        daemons[0].stop()


def test_stop_kills_a_daemon_that_ignores_sigterm(tmp_path: Path) -> None:
    daemon = _python_daemon(
        tmp_path,
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n",
    )
    pid = daemon.start()
    daemon.wait_ready(lambda: "ready" in daemon.log.read_text(), timeout=10)
    assert daemon.stop(timeout=0.5) == pid
    assert not _exists(pid)


def test_a_recycled_pid_is_not_ours(tmp_path: Path) -> None:
    daemon = _python_daemon(tmp_path, "import time\ntime.sleep(120)\n")
    daemon.run_dir.mkdir(parents=True)
    # A pid file naming a live process that is not the daemon (this test process).
    daemon.pid_path.write_text(f"{os.getpid()}\n")
    assert daemon.pid() is None
    assert not daemon.pid_path.exists()
    daemon.pid_path.write_text(f"{os.getpid()}\n")
    assert daemon.stop() is None  # and above all, we were not signalled


def test_wait_ready_fails_fast_with_the_log_tail(tmp_path: Path) -> None:
    daemon = _python_daemon(
        tmp_path, "import sys\nprint('boom: bad config', flush=True)\nsys.exit(3)\n"
    )
    daemon.start()
    with pytest.raises(NotReadyError) as info:
        daemon.wait_ready(lambda: False, timeout=30)
    message = str(info.value)
    assert "exited before it was ready" in message
    assert "boom: bad config" in message


def test_wait_until_times_out_quoting_the_last_error() -> None:
    def check() -> bool:
        raise ConnectionRefusedError("nobody home")

    with pytest.raises(NotReadyError, match="nobody home"):
        wait_until(check, timeout=0.2, what="thing")


def test_start_reports_a_missing_program(tmp_path: Path) -> None:
    daemon = Daemon(name="ghost", argv=[str(tmp_path / "no-such-program")], run_dir=tmp_path)
    with pytest.raises(ProcessError, match="cannot start ghost"):
        daemon.start()


# ---------------------------------------------------------------------- stack


def test_external_services_are_left_alone(tmp_path: Path) -> None:
    settings = Settings(
        state_dir=tmp_path,
        kafka=KafkaSettings(bootstrap="kafka.example:9092"),
        redis=RedisSettings(url="redis://redis.example:6379/0"),
    )
    stack = Stack(settings)
    assert stack.down() == {}
    assert not tmp_path.joinpath("kafka").exists()
    assert stack.up(timeout=1) == {}
    assert stack.status() == {
        "kafka": "external kafka.example:9092",
        "redis": "external redis://redis.example:6379/0",
    }
    assert stack.down() == {}


def test_up_refuses_a_port_someone_else_holds(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        port = int(squatter.getsockname()[1])
        settings = Settings(
            state_dir=tmp_path,
            kafka=KafkaSettings(bootstrap="kafka.example:9092"),
            redis=RedisSettings(port=port),
        )
        with pytest.raises(StackError, match=f"port {LOOPBACK}:{port} is taken"):
            Stack(settings).up(timeout=5)
    assert Stack(settings).status()["redis"] == "stopped"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    kafka_port, controller_port, redis_port = free_ports(3)
    settings = Settings(
        state_dir=tmp_path / "state",
        kafka=KafkaSettings(port=kafka_port, controller_port=controller_port),
        redis=RedisSettings(port=redis_port),
    )
    stack = Stack(settings)
    try:
        yield stack
    finally:
        stack.down()  # whatever happened, leave no broker behind


async def _read_topic(servers: str) -> list[tuple[bytes, bytes]]:
    """Every record of the test topic, from the beginning of the log."""
    tp = TopicPartition(TOPIC, 0)
    consumer = AIOKafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False)
    await consumer.start()
    try:
        end = (await consumer.end_offsets([tp]))[tp]
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        records: list[tuple[bytes, bytes]] = []
        async with asyncio.timeout(30):
            while await consumer.position(tp) < end:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                records += [(r.key, r.value) for r in batch.get(tp, [])]
        return records
    finally:
        await consumer.stop()


async def test_stack_keeps_the_log_and_redis_across_a_restart(stack: Stack) -> None:
    servers = stack.settings.kafka.servers
    ready = await asyncio.to_thread(stack.up)
    assert set(ready) == {"kafka", "redis"}
    status = stack.status()
    assert status["kafka"] == f"running pid {stack.kafka_daemon.pid()} on {servers}"
    assert status["redis"].startswith("running pid ")
    layout = ["server.properties", "log4j2.properties", "cluster.id", "server.log"]
    assert all((stack.kafka_dir / name).exists() for name in layout)
    cluster_id = (stack.kafka_dir / "cluster.id").read_text()

    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=servers, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(TOPIC, b"hello", key=b"conv-1")
    finally:
        await producer.stop()
    assert await _read_topic(servers) == [(b"conv-1", b"hello")]

    client = aioredis.Redis.from_url(stack.settings.redis.dsn)
    await client.set("kefu:test:kept", "yes")
    await client.aclose()

    pids = {"kafka": stack.kafka_daemon.pid(), "redis": stack.redis_daemon.pid()}
    assert await asyncio.to_thread(stack.down) == {
        name: f"stopped pid {pid}" for name, pid in pids.items()
    }
    assert stack.status() == {"kafka": "stopped", "redis": "stopped"}
    assert not any(_exists(pid) for pid in pids.values() if pid)
    assert not port_open(stack.settings.kafka.port)

    # Restart on the same state: same cluster, same log, same keys.
    await asyncio.to_thread(stack.up)
    restarted = stack.kafka_daemon.pid()
    assert restarted not in (None, pids["kafka"])
    assert (stack.kafka_dir / "cluster.id").read_text() == cluster_id
    assert await _read_topic(servers) == [(b"conv-1", b"hello")]
    client = aioredis.Redis.from_url(stack.settings.redis.dsn)
    try:
        assert await client.get("kefu:test:kept") == b"yes"
    finally:
        await client.aclose()

    # up() on a running stack starts nothing new.
    again = await asyncio.to_thread(stack.up)
    assert set(again) == {"kafka", "redis"}
    assert stack.kafka_daemon.pid() == restarted
    await asyncio.to_thread(stack.down)
    assert stack.status() == {"kafka": "stopped", "redis": "stopped"}


def test_fetch_kafka_jars_copies_once(tmp_path: Path) -> None:
    # A private jars dir, so Maven really copies (from ~/.m2 when it is warm).
    stack = Stack(Settings(state_dir=tmp_path, kafka=KafkaSettings(jars_dir=tmp_path / "jars")))
    version = stack.settings.kafka.version
    jars = stack.fetch_kafka_jars()
    assert jars == tmp_path / "jars" / version
    assert (jars / ".complete").exists()
    assert (jars / f"kafka_2.13-{version}.jar").exists()
    assert any(p.name.startswith("log4j-core-") for p in jars.iterdir())
    assert sorted(p.name for p in (tmp_path / "jars").iterdir()) == [version]  # no temp left
    marker_time = (jars / ".complete").stat().st_mtime_ns
    assert stack.fetch_kafka_jars() == jars
    assert (jars / ".complete").stat().st_mtime_ns == marker_time  # nothing redone


def test_fetch_without_maven_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a machine without mvn or java
    stack = Stack(Settings(state_dir=tmp_path, kafka=KafkaSettings(jars_dir=tmp_path / "jars")))
    with pytest.raises(StackError, match="make setup"):
        stack.fetch_kafka_jars()
