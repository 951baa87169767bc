"""Supervision of background daemons through pid files (Kafka, Redis, workers, gateway).

A :class:`Daemon` is started detached in its own session, so it outlives the command
that started it (``kefu stack up`` returns) and a Ctrl-C in that terminal does not
reach it. Its pid goes to ``<run_dir>/<name>.pid``; liveness is the pid file plus a
check that ``/proc/<pid>/cmdline`` still contains the daemon's marker, so a recycled
pid is never mistaken for ours (and never signalled). Everything listens on loopback.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

LOOPBACK = "127.0.0.1"

# Passed through to children; everything else a daemon needs is given explicitly,
# so a stray variable in the user's shell (KEFU_*, KAFKA_OPTS, ...) cannot leak in.
_PASS_THROUGH_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR", "JAVA_HOME")


class ProcessError(RuntimeError):
    """A daemon could not be started, stopped or did not become ready."""


class NotReadyError(ProcessError, TimeoutError):
    """A readiness check did not pass in time (or the process died while waiting)."""


def _ephemeral_floor() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Below the kernel's ephemeral range: a port the OS would hand out (bind to 0) can be
# taken by any outgoing connection between the moment it is picked and the moment the
# daemon binds it, which made "address already in use" a rare flake under load.
_PORT_RANGE = range(20000, min(_ephemeral_floor(), 65536))
# Ports this process handed out: they stay free until their daemon binds them, so a
# later pick (another fixture's port) could otherwise return the same one.
_HANDED_OUT: set[int] = set()


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports on loopback that are free right now, picked at random
    outside the ephemeral range (all held open at once, so none repeats)."""
    if len(_PORT_RANGE) < count * 4:  # an odd ip_local_port_range: let the OS pick
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(socket.socket()) for _ in range(count)]
            for sock in socks:
                sock.bind((LOOPBACK, 0))
            return [int(sock.getsockname()[1]) for sock in socks]
    chosen: list[int] = []
    with contextlib.ExitStack() as stack:
        for port in random.sample(_PORT_RANGE, min(len(_PORT_RANGE), count * 50)):
            if port in _HANDED_OUT:
                continue
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            chosen.append(port)
            if len(chosen) == count:
                _HANDED_OUT.update(chosen)
                return chosen
    raise ProcessError(f"no {count} free ports on {LOOPBACK}")


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    return free_ports(1)[0]


def free_run(length: int, avoid: Sequence[int] = ()) -> int:
    """The first of ``length`` consecutive free ports (extra workers bind
    ``web_port + index``), none of them in ``avoid``."""
    for _ in range(100):
        first = free_port()
        run = range(first, first + length)
        taken = any(p in avoid for p in run) or any(p in _HANDED_OUT for p in run[1:])
        if first + length > 65536 or taken:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in run:
                    stack.enter_context(socket.socket()).bind((LOOPBACK, port))
            except OSError:
                continue
        _HANDED_OUT.update(run)
        return first
    raise ProcessError(f"no {length} consecutive free ports on {LOOPBACK}")


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal environment for a daemon: a few basics from ours plus ``extra``."""
    env = {key: os.environ[key] for key in _PASS_THROUGH_ENV if key in os.environ}
    env.update(extra or {})
    return env


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ("" if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            # Room for long (Java) lines without reading a big log whole.
            f.seek(max(0, size - 512 * lines))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _cmdline(pid: int) -> str | None:
    """The process's command line joined by spaces; None if there is no such process.

    Linux only (``/proc``), like the rest of the embedded stack. A zombie has an empty
    command line, so it never matches a marker: it is dead, just not yet reaped.
    """
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode("utf-8", "replace").strip()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes (flock on ``path``), held for the block.

    Serialises "is it running? then start it" so two launchers cannot both start one
    daemon. The kernel drops the lock if the holder dies, so it never goes stale.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# Daemons started by this very process. Kept so stop() can reap them (a zombie would
# linger until we exit) and so Popen does not warn, when collected, that they still run.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _reap(pid: int) -> None:
    # Only pids in _children: another pid's exit status is not ours to collect.
    proc = _children.get(pid)
    if proc is not None and proc.poll() is not None:
        del _children[pid]


def wait_until(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    log_path: Path | None = None,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.05,
) -> float:
    """Poll ``check`` until it returns true; return the seconds it took.

    An exception from ``check`` counts as "not yet" (a refused connection is the normal
    way of not being ready) and is quoted if the wait fails. ``alive`` lets the wait
    fail at once when the process died instead of running out the timeout. The error
    carries the tail of ``log_path``, which is usually where the reason is.
    """
    start = time.monotonic()
    deadline = start + timeout
    last_error: BaseException | None = None
    while True:
        try:
            if check():
                return time.monotonic() - start
        except Exception as exc:
            last_error = exc
        if alive is not None and not alive():
            reason = f"{what}: the process exited before it was ready"
            break
        if time.monotonic() >= deadline:
            reason = f"{what}: not ready after {timeout:g} s"
            break
        time.sleep(interval)
    if last_error is not None:
        reason += f" (last check error: {last_error!r})"
    if log_path is not None:
        tail = log_tail(log_path)
        reason += f"\n--- tail of {log_path} ---\n{tail}" if tail else f"\n{log_path} is empty"
    raise NotReadyError(reason)


@dataclass(frozen=True)
class Daemon:
    """One background process, identified by its pid file and a command-line marker.

    ``marker`` must appear in ``/proc/<pid>/cmdline`` for the pid to count as ours;
    make it unique per instance (e.g. an absolute config path in the state dir). It
    defaults to the whole argv, which is right for processes that keep their argv
    (Java); set it explicitly for ones that rewrite their title (redis-server).
    """

    name: str
    argv: Sequence[str]
    run_dir: Path
    env: Mapping[str, str] = field(default_factory=child_env)
    cwd: Path | None = None
    log_path: Path | None = None
    marker: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "run_dir", Path(self.run_dir).absolute())
        if not self.marker:
            object.__setattr__(self, "marker", " ".join(self.argv))

    @property
    def pid_path(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return self.log_path or self.run_dir / f"{self.name}.log"

    def pid(self) -> int | None:
        """The pid if the daemon runs; a stale pid file is removed."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if not self._alive(pid):
            self.pid_path.unlink(missing_ok=True)
            return None
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def start(self) -> int:
        """Start the daemon unless it already runs; return its pid."""
        with file_lock(self.run_dir / f"{self.name}.lock"):
            existing = self.pid()
            if existing is not None:
                return existing
            return self._spawn()

    def _spawn(self) -> int:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            # A header per start, so a log tail shows where this run's output begins.
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            log.write(f"--- kefu: starting {self.name} at {stamp}: {self.marker}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    self.argv,
                    cwd=self.cwd or self.run_dir,
                    env=dict(self.env),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ProcessError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        _children[proc.pid] = proc
        # Write-then-rename: a reader never sees a half-written pid file.
        tmp = self.pid_path.with_suffix(".pid.tmp")
        tmp.write_text(f"{proc.pid}\n")
        tmp.replace(self.pid_path)
        self._wait_identifiable(proc)
        return proc.pid

    def _wait_identifiable(self, proc: subprocess.Popen[bytes]) -> None:
        # Popen (vfork) returns while execve is still setting up the new image, when
        # /proc/<pid>/cmdline reads empty; until it shows the marker the daemon would
        # look dead. An early exit is left to wait_ready, which quotes the log.
        deadline = time.monotonic() + 5.0
        while proc.poll() is None and not self._alive(proc.pid):
            if time.monotonic() >= deadline:
                self._signal(proc.pid, signal.SIGKILL)
                raise ProcessError(
                    f"{self.name} (pid {proc.pid}) started, but its command line never "
                    f"showed the marker {self.marker!r}"
                )
            time.sleep(0.002)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the pid it stopped."""
        pid = self.pid()
        if pid is None:
            return None
        self._signal(pid, signal.SIGTERM)
        if not self._wait_gone(pid, timeout):
            self._signal(pid, signal.SIGKILL)
            if not self._wait_gone(pid, 5.0):
                raise ProcessError(f"{self.name} (pid {pid}) survived SIGKILL")
        self.pid_path.unlink(missing_ok=True)
        return pid

    def wait_ready(
        self, check: Callable[[], bool], timeout: float, what: str = "", interval: float = 0.05
    ) -> float:
        """:func:`wait_until` for this daemon: fails fast if it exits, quotes its log."""
        return wait_until(
            check,
            timeout=timeout,
            what=what or self.name,
            log_path=self.log,
            alive=self.is_running,
            interval=interval,
        )

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if not self._alive(pid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _alive(self, pid: int) -> bool:
        _reap(pid)
        cmdline = _cmdline(pid)
        return bool(cmdline) and self.marker in (cmdline or "")

    def _signal(self, pid: int, sig: signal.Signals) -> None:
        # The daemon leads its own session: signal the whole group so helpers it
        # spawned go too; the pid was just verified as ours, so the group is ours.
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
