"""The embedded stack: Kafka (KRaft: one node, or a cluster of ``kafka.brokers``
nodes on loopback, each broker and controller) and Redis, run from the state dir.

Layout under ``<state dir>``::

    kafka/  server.properties  log4j2.properties  cluster.id  data/  server.log  kafka.pid
    kafka/node-2/  server.properties  data/  server.log  kafka-2.pid   (a cluster's nodes)
    redis/  redis.conf  appendonlydir/  redis.log  redis.pid

A cluster (``kefu stack up --brokers 3``) has replication factor 3 and
min.insync.replicas 2 for every topic (``kefu/topics.py``); producers send acks=all
and idempotently, so a broker can be SIGKILLed without losing or duplicating an
acknowledged write (``tests/test_kafka_cluster.py``).

The broker's jars come from Maven Central through ``kefu/kafka/pom.xml`` into
``<settings.kafka.jars_dir>/<version>`` and are shared by every state dir. Both
services keep their data across ``down``/``up``: the Kafka log is the truth, so it is
never deleted or expired here. A service with an external address in the settings
(``kafka.bootstrap``, ``redis.url``) is left alone.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
from aiokafka.admin import AIOKafkaAdminClient  # type: ignore[import-untyped, unused-ignore]

from kefu.processes import LOOPBACK, Daemon, ProcessError, child_env, file_lock, port_open
from kefu.settings import Settings

T = TypeVar("T")

POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
# Written last into a jars dir: its presence means the copy is complete.
JARS_MARKER = ".complete"

_SETUP_HINT = "run `make setup`, or install Maven and Java (apt-get install maven default-jre)"
_REDIS_HINT = "run `make setup`, or install Redis (apt-get install redis-server)"


class StackError(ProcessError):
    """The embedded stack cannot be set up or started (missing tool, busy port, ...)."""


def _require(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise StackError(f"`{tool}` not found on PATH: {hint}")
    return path


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _java_escape(value: str) -> str:
    # Kafka reads .properties as ISO-8859-1 with backslash escapes: keep paths intact.
    out = value.replace("\\", "\\\\")
    return "".join(c if ord(c) < 128 else f"\\u{ord(c):04x}" for c in out)


def _redis_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _new_cluster_id() -> str:
    """A Kafka cluster id, as ``StorageTool random-uuid`` makes one (saves a JVM start).

    Kafka's ``Uuid`` is 16 random bytes in URL-safe base64 without padding; it rejects
    the all-zero and the metadata-topic id and never starts with "-" (it would read
    as a command-line flag).
    """
    while True:
        raw = uuid.uuid4().bytes
        text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        if not text.startswith("-") and int.from_bytes(raw) > 1:
            return text


def _run_in_thread(coro: Coroutine[Any, Any, T]) -> T:
    # A fresh loop in a helper thread: works whether or not the caller runs a loop
    # itself, and leaves the caller's thread (and its current loop) untouched.
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Mute a logger while polling a service that is expected to refuse at first."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


async def _kafka_metadata(servers: str, brokers: int = 1) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=servers, request_timeout_ms=3000)
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
        return len(cluster.get("brokers") or ()) >= brokers
    finally:
        await admin.close()


@dataclass(frozen=True, slots=True)
class KafkaNode:
    """One embedded broker (a KRaft node that is broker and controller)."""

    node_id: int
    port: int
    controller_port: int
    dir: Path  # node 1: <state>/kafka (as a single broker always had); n: kafka/node-<n>

    @property
    def name(self) -> str:
        return "kafka" if self.node_id == 1 else f"kafka-{self.node_id}"


class Stack:
    """Start, stop and inspect the embedded Kafka and Redis of one state dir."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.state_dir.expanduser().resolve()
        self.kafka_dir = self.state_dir / "kafka"
        self.redis_dir = self.state_dir / "redis"
        kafka = settings.kafka
        self.jars_dir = (kafka.jars_dir.expanduser() / kafka.version).resolve()

    # ----------------------------------------------------------------- what runs

    @property
    def embedded_kafka(self) -> bool:
        return not self.settings.kafka.bootstrap

    @property
    def embedded_redis(self) -> bool:
        return not self.settings.redis.url

    @property
    def kafka_nodes(self) -> list[KafkaNode]:
        return [
            KafkaNode(
                n + 1, port, controller, self.kafka_dir / f"node-{n + 1}" if n else self.kafka_dir
            )
            for n, (port, controller) in enumerate(self.settings.kafka.node_ports())
        ]

    @property
    def kafka_daemon(self) -> Daemon:
        """The (first) broker as a :class:`Daemon` (for pid, status, stop)."""
        return self._kafka_daemon(shutil.which("java") or "java")

    @property
    def kafka_daemons(self) -> list[Daemon]:
        """Every embedded broker, node 1 first."""
        java = shutil.which("java") or "java"
        return [self._kafka_daemon(java, node) for node in self.kafka_nodes]

    def _kafka_daemon(self, java: str, node: KafkaNode | None = None) -> Daemon:
        kafka = self.settings.kafka
        node = node or self.kafka_nodes[0]
        props = node.dir / "server.properties"
        argv = [
            java,
            f"-Xmx{kafka.heap}",
            # The JVM flags of kafka-run-class.sh: G1 with short pauses.
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            *self._class_archive_flags(java),
            *kafka.jvm_options,
            f"-Dlog4j2.configurationFile={self.kafka_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={node.dir}",
            "-cp",
            f"{self.jars_dir}/*",
            "kafka.Kafka",
            str(props),
        ]
        return Daemon(
            name=node.name,
            argv=argv,
            run_dir=node.dir,
            env=child_env(),
            log_path=node.dir / "server.log",
            # The absolute config path is unique to this state dir.
            marker=str(props),
        )

    def _class_archive(self, java: str) -> Path | None:
        """Where the broker's class-data-sharing archive for this JDK lives, if any.

        A CDS archive of the classes the broker loads cuts its start by ~0.8 s of
        ~2.1 s. It is only valid for one JDK build and one set of jars, so it lives
        in the jars dir (refetching drops it) and its name hashes the JDK binary; a
        stale one is rejected by the JVM, which then just starts without it.
        """
        try:
            real = Path(java).resolve(strict=True)
            st = real.stat()
        except OSError:
            return None
        tag = hashlib.sha1(f"{real}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        return self.jars_dir / f"classes-{tag}.jsa"

    def _class_archive_flags(self, java: str) -> list[str]:
        archive = self._class_archive(java)
        if archive is None:
            return []
        if archive.exists():
            return [f"-XX:SharedArchiveFile={archive}"]
        # None yet: this run writes one when it exits, and down() files it. The dump's
        # hundreds of "skipping class" notes would only clutter server.log.
        return [f"-XX:ArchiveClassesAtExit={self.kafka_dir / 'classes.jsa'}", "-Xlog:cds*=off"]

    def _keep_class_archive(self) -> None:
        """File the archive a broker dumped at exit, if it is sound and none exists yet."""
        dump = self.kafka_dir / "classes.jsa"
        if not dump.exists():
            return
        java = shutil.which("java")
        archive = self._class_archive(java) if java else None
        tmp = None
        try:
            if java and archive is not None and not archive.exists():
                # Copy next to the target, check, then rename: a truncated archive (a
                # broker killed while dumping) crashes every JVM that maps it.
                tmp = archive.with_suffix(f".{os.getpid()}.tmp")
                shutil.copyfile(dump, tmp)
                if self._archive_loads(java, tmp):
                    tmp.replace(archive)
        except OSError:
            pass  # only a speed-up: the next start simply dumps again
        finally:
            dump.unlink(missing_ok=True)
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def _archive_loads(self, java: str, archive: Path) -> bool:
        # -Xshare:on turns "cannot use the archive" into a failed exit instead of a
        # silent fallback; a tiny Kafka tool checks it against the broker's classpath.
        cmd = [
            java,
            f"-Xmx{self.settings.kafka.heap}",  # same heap layout as the broker's
            "-XX:+UseG1GC",
            "-Xshare:on",
            f"-XX:SharedArchiveFile={archive}",
            "-Xlog:disable",
            "-cp",
            f"{self.jars_dir}/*",
            "kafka.tools.StorageTool",
            "random-uuid",
        ]
        with tempfile.TemporaryDirectory() as scratch:  # where a crash report would go
            try:
                proc = subprocess.run(cmd, capture_output=True, timeout=60, cwd=scratch)
            except subprocess.TimeoutExpired:
                return False
        return proc.returncode == 0

    @property
    def redis_daemon(self) -> Daemon:
        conf = self.redis_dir / "redis.conf"
        return Daemon(
            name="redis",
            argv=[shutil.which("redis-server") or "redis-server", str(conf)],
            run_dir=self.redis_dir,
            env=child_env(),
            log_path=self.redis_dir / "redis.log",
            # redis.conf sets a process title that keeps the config path, so the
            # marker matches both before and after redis-server renames itself.
            marker=str(conf),
        )

    # ------------------------------------------------------------------ commands

    def fetch_kafka_jars(self) -> Path:
        """Copy the broker's jars for ``settings.kafka.version`` into the jars dir.

        Idempotent: a complete dir (marker file present) is left as it is. The copy
        goes to a temporary sibling and is renamed into place, so an interrupted
        fetch, or two at once, never leaves a half-filled dir that looks complete.
        """
        target = self.jars_dir
        if (target / JARS_MARKER).exists():
            return target
        mvn = _require("mvn", _SETUP_HINT)
        _require("java", _SETUP_HINT)
        version = self.settings.kafka.version
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
        try:
            cmd = [
                mvn,
                "-q",
                "-B",
                "-f",
                str(POM),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={tmp}",
                f"-Dkafka.version={version}",
            ]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired as exc:
                raise StackError(f"mvn took over {exc.timeout:.0f} s fetching Kafka") from exc
            if proc.returncode != 0:
                raise StackError(
                    f"mvn could not fetch the jars of Kafka {version} (exit {proc.returncode}):\n"
                    + _tail(proc.stdout + proc.stderr)
                )
            if not (tmp / f"kafka_2.13-{version}.jar").exists():
                raise StackError(f"mvn ran but {tmp} has no kafka_2.13-{version}.jar")
            (tmp / JARS_MARKER).write_text(f"kafka_2.13 {version}\n")
            tmp.chmod(0o755)  # mkdtemp made it private; the cache is not secret
            if (target / JARS_MARKER).exists():  # another fetch finished meanwhile
                return target
            if target.exists():  # an incomplete dir from before the marker existed
                shutil.rmtree(target)
            try:
                tmp.rename(target)
            except OSError:
                if not (target / JARS_MARKER).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def up(self, timeout: float = 60.0) -> dict[str, float]:
        """Start what is not running and wait until it answers.

        Returns, per embedded service, the seconds from this call to its first good
        answer (metadata for Kafka, PING for Redis). On failure the services this call
        started are stopped again and the error quotes the tail of their log.
        """
        # One launcher at a time per state dir: the config files and the storage
        # format must not be written by two at once.
        with file_lock(self.state_dir / "stack.lock"):
            return self._up(timeout)

    def _up(self, timeout: float) -> dict[str, float]:
        start = time.monotonic()
        deadline = start + timeout

        def left() -> float:
            return max(deadline - time.monotonic(), 0.0)

        nodes = self.kafka_nodes if self.embedded_kafka else []
        brokers = self.kafka_daemons if self.embedded_kafka else []
        redis_ = self.redis_daemon if self.embedded_redis else None
        to_start = [node for node, d in zip(nodes, brokers, strict=True) if not d.is_running()]
        start_redis = redis_ is not None and not redis_.is_running()
        # Everything that can fail fast (missing tool, busy port) before starting.
        java = ""
        if to_start:
            self.fetch_kafka_jars()
            java = _require("java", _SETUP_HINT)
            for node in to_start:
                self._check_free(f"Kafka node {node.node_id}", node.port, "KEFU_KAFKA__PORT")
                self._check_free(
                    f"Kafka controller {node.node_id}",
                    node.controller_port,
                    "KEFU_KAFKA__CONTROLLER_PORT",
                )
            self._write_log4j()
            for node in nodes:
                self._write_kafka_config(node)
        if start_redis:
            _require("redis-server", _REDIS_HINT)
            self._check_free("Redis", self.settings.redis.port, "KEFU_REDIS__PORT")
            self._write_redis_config()

        started: list[Daemon] = []
        ready: dict[str, float] = {}
        try:
            # Redis first: it answers within milliseconds, then Kafka formats and boots.
            if redis_ is not None:
                if start_redis:
                    started.append(redis_)
                    redis_.start()
                redis_.wait_ready(self._redis_answers, left(), "Redis")
                ready["redis"] = time.monotonic() - start
            for node in to_start:  # a cluster's nodes start together: the quorum needs them
                self._format_kafka(java, node)
                daemon = self._kafka_daemon(java, node)  # with this start's JVM flags
                started.append(daemon)
                daemon.start()
            if brokers:
                with _quiet("aiokafka"):
                    brokers[0].wait_ready(self._kafka_answers, left(), "Kafka")
                ready["kafka"] = time.monotonic() - start
        except BaseException as exc:
            kafka_died = any(d.name.startswith("kafka") and not d.is_running() for d in started)
            for daemon in reversed(started):
                daemon.stop(timeout=10.0)
            archive = self._class_archive(java) if kafka_died else None
            if archive is not None and archive.exists():
                # Never let a damaged class archive fail two starts: it is only a
                # speed-up, and the next start writes a new one.
                archive.unlink(missing_ok=True)
                raise StackError(
                    f"{exc}\n(kefu removed the JVM class archive {archive} in case it "
                    "was the cause; run `kefu stack up` again)"
                ) from exc
            raise
        return ready

    def down(self) -> dict[str, str]:
        """Stop the embedded services (Kafka first: it may still flush to its log)."""
        if not self.state_dir.exists():  # nothing ever ran here: do not create it
            return self._down()
        with file_lock(self.state_dir / "stack.lock"):
            return self._down()

    def _down(self) -> dict[str, str]:
        result: dict[str, str] = {}
        if self.embedded_kafka:
            for daemon in reversed(self.kafka_daemons):
                pid = daemon.stop(timeout=60.0)
                result[daemon.name] = f"stopped pid {pid}" if pid else "not running"
            self._keep_class_archive()
        if self.embedded_redis:
            pid = self.redis_daemon.stop(timeout=30.0)
            result["redis"] = f"stopped pid {pid}" if pid else "not running"
        return result

    def status(self) -> dict[str, str]:
        """One line per service: where it runs, or "stopped", or the external address."""
        result: dict[str, str] = {}
        kafka, redis_ = self.settings.kafka, self.settings.redis
        if self.embedded_kafka:
            for node, daemon in zip(self.kafka_nodes, self.kafka_daemons, strict=True):
                pid = daemon.pid()
                where = kafka.servers if kafka.brokers == 1 else f"{LOOPBACK}:{node.port}"
                result[daemon.name] = f"running pid {pid} on {where}" if pid else "stopped"
        else:
            result["kafka"] = f"external {kafka.bootstrap}"
        if self.embedded_redis:
            pid = self.redis_daemon.pid()
            addr = f"{LOOPBACK}:{redis_.port}"
            result["redis"] = f"running pid {pid} on {addr}" if pid else "stopped"
        else:
            result["redis"] = f"external {redis_.url}"
        return result

    # ------------------------------------------------------------------- helpers

    def _check_free(self, what: str, port: int, setting: str) -> None:
        # Our daemon is not running, so anyone on the port is a stranger; without this
        # check the readiness probe could even be answered by that stranger.
        if port_open(port):
            raise StackError(
                f"{what} port {LOOPBACK}:{port} is taken by another process; "
                f"stop it or choose another port ({setting})"
            )

    def _kafka_answers(self) -> bool:
        kafka = self.settings.kafka
        if not all(port_open(port) for port, _ in kafka.node_ports()):
            return False
        return _run_in_thread(_kafka_metadata(kafka.servers, kafka.brokers))

    def _redis_answers(self) -> bool:
        client = redis.Redis.from_url(
            self.settings.redis.dsn, socket_connect_timeout=0.5, socket_timeout=2.0
        )
        try:
            # Answers LOADING (an error) while it replays a big append-only file.
            return bool(client.ping())
        finally:
            client.close()

    def _write_kafka_config(self, node: KafkaNode) -> None:
        kafka = self.settings.kafka
        data = node.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        plain = f"PLAINTEXT://{LOOPBACK}:{node.port}"
        voters = ",".join(f"{n.node_id}@{LOOPBACK}:{n.controller_port}" for n in self.kafka_nodes)
        # One node: every internal topic has one replica. A cluster: three, and a write
        # is acknowledged once two have it (producers send acks=all).
        replicas = str(kafka.replication)
        in_sync = "2" if kafka.replication >= 3 else "1"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"{plain},CONTROLLER://{LOOPBACK}:{node.controller_port}",
            "advertised.listeners": plain,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": str(kafka.partitions),
            # Topics are created explicitly, with their partition counts and configs.
            "auto.create.topics.enable": "false",
            "default.replication.factor": replicas,
            "offsets.topic.replication.factor": replicas,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": in_sync,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": in_sync,
            "min.insync.replicas": in_sync,
            # No unclean leader election: a replica that missed writes never leads.
            "unclean.leader.election.enable": "false",
            # A dead broker is fenced (its partitions get new leaders) after 3 s, not
            # the default 9: on loopback heartbeats are not delayed by a network.
            "broker.heartbeat.interval.ms": "1000",
            "broker.session.timeout.ms": "3000",
            # A group starts consuming at once instead of waiting 3 s for more members.
            "group.initial.rebalance.delay.ms": "0",
            # The log is the truth: never expire it by age or size.
            "log.retention.ms": "-1",
            "log.retention.bytes": "-1",
        }
        text = "# Written by kefu on every start; edits here are overwritten.\n"
        text += "".join(f"{key}={_java_escape(value)}\n" for key, value in props.items())
        (node.dir / "server.properties").write_text(text, encoding="latin-1")

    def _write_log4j(self) -> None:
        self.kafka_dir.mkdir(parents=True, exist_ok=True)
        # Everything to stdout, which the launcher sends to server.log: one file,
        # which also gets what the JVM itself prints (a crash, a bad flag).
        log4j = [
            "status = warn",
            # Kafka logs its own shutdown from a JVM hook: log4j must not close first.
            "shutdownHook = disable",
            "appender.out.type = Console",
            "appender.out.name = OUT",
            "appender.out.target = SYSTEM_OUT",
            "appender.out.layout.type = PatternLayout",
            "appender.out.layout.pattern = [%d] %p %m (%c)%n",
            "rootLogger.level = INFO",
            "rootLogger.appenderRef.out.ref = OUT",
            # Per-request lines would swamp the log.
            "logger.request.name = kafka.request.logger",
            "logger.request.level = WARN",
            "logger.channel.name = kafka.network.RequestChannel$",
            "logger.channel.level = WARN",
            # Full config dumps (~1,200 lines a start); server.properties says it all.
            "logger.config.name = org.apache.kafka.common.config.AbstractConfig",
            "logger.config.level = WARN",
        ]
        (self.kafka_dir / "log4j2.properties").write_text("\n".join(log4j) + "\n")

    def _format_kafka(self, java: str, node: KafkaNode) -> None:
        """Format the storage once; later starts reuse it (and so keep the log). The
        nodes of a cluster share the cluster id."""
        data = node.dir / "data"
        if (data / "meta.properties").exists():
            return
        id_file = self.kafka_dir / "cluster.id"
        if id_file.exists():
            cluster_id = id_file.read_text().strip()
        else:
            cluster_id = _new_cluster_id()
            id_file.write_text(cluster_id + "\n")
        archive = self._class_archive(java)
        # The broker's class archive covers the tool too (~0.3 s of its ~0.8 s).
        shared = [f"-XX:SharedArchiveFile={archive}"] if archive and archive.exists() else []
        cmd = [
            java,
            *shared,
            f"-Dlog4j2.configurationFile={self.kafka_dir / 'log4j2.properties'}",
            "-cp",
            f"{self.jars_dir}/*",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(node.dir / "server.properties"),
        ]

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=120,
                env=child_env(),
                cwd=node.dir,
            )

        proc = run()
        if proc.returncode != 0 and archive is not None and shared:
            # Perhaps a damaged archive: drop it (only a speed-up) and try without.
            archive.unlink(missing_ok=True)
            cmd.remove(shared[0])
            proc = run()
        if proc.returncode != 0:
            raise StackError(
                f"formatting Kafka's storage in {data} failed (exit {proc.returncode}):\n"
                + _tail(proc.stdout + proc.stderr)
            )

    def _write_redis_config(self) -> None:
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        conf = self.redis_dir / "redis.conf"
        lines = [
            "# Written by kefu on every start; edits here are overwritten.",
            f"bind {LOOPBACK}",
            f"port {self.settings.redis.port}",
            "protected-mode yes",
            "daemonize no",
            f"dir {_redis_quote(str(self.redis_dir))}",
            f"logfile {_redis_quote(str(self.redis_dir / 'redis.log'))}",
            # Every write goes to the append-only file (fsync each second); the RDB
            # snapshots would only duplicate it.
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            # Keep the config path in the process title: it identifies this instance.
            'proc-title-template "{title} {listen-addr} {server-mode} {config-file}"',
            "always-show-logo no",
        ]
        conf.write_text("\n".join(lines) + "\n")
