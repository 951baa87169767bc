"""kefu's own processes as background daemons: the ClickHouse projector, workers, the
gateway and the development webhook sink. Each gets the settings through ``KEFU_*``
variables and reports ready through a health endpoint."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from kefu.processes import Daemon, child_env, port_open
from kefu.runtime import settings_env
from kefu.settings import Settings


def _http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        return httpx.get(url, timeout=1.0).status_code == 200

    return check


@dataclass(frozen=True, slots=True)
class Service:
    daemon: Daemon
    ready: Callable[[], bool]


class Services:
    def __init__(self, settings: Settings, workers: int = 1) -> None:
        self.settings = settings
        self.workers = workers
        self.run_dir = settings.state_dir.absolute() / "run"
        self.log_dir = settings.state_dir.absolute() / "logs"

    def _daemon(self, name: str, *args: str) -> Daemon:
        state = str(self.settings.state_dir.absolute())
        # The marker ties a pid to this service of this state dir (see Daemon).
        marker = f"--instance {name} --state {state}"
        argv = [sys.executable, "-m", "kefu.cli", *args, *marker.split(" ", 3)]
        env = child_env(settings_env(self.settings))
        return Daemon(
            name=name,
            argv=argv,
            run_dir=self.run_dir,
            env=env,
            log_path=self.log_dir / f"{name}.log",
            marker=marker,
        )

    def clickhouse(self) -> Service:
        s = self.settings
        daemon = self._daemon("clickhouse", "projector")
        if s.embedded_clickhouse:
            return Service(daemon, _http_ok(f"http://127.0.0.1:{s.clickhouse.query_port}/healthz"))
        return Service(daemon, daemon.is_running)

    def worker(self, index: int) -> Service:
        port = self.settings.worker.web_port + index
        daemon = self._daemon(f"worker-{index}", "worker", "--web-port", str(port))
        return Service(daemon, _http_ok(f"http://127.0.0.1:{port}/healthz"))

    def gateway(self) -> Service:
        g = self.settings.gateway
        return Service(
            self._daemon("gateway", "gateway"), _http_ok(f"http://{g.host}:{g.port}/healthz")
        )

    def webhook_sink(self) -> Service:
        port = self.settings.dev.webhook_sink_port
        return Service(
            self._daemon("webhook-sink", "webhook-sink"),
            _http_ok(f"http://127.0.0.1:{port}/received"),
        )

    def smtp(self) -> Service:
        port = self.settings.email.port
        return Service(self._daemon("smtp", "smtp"), lambda: port_open(port))

    def app_services(self) -> list[Service]:
        return [
            self.webhook_sink(),
            *(self.worker(i) for i in range(self.workers)),
            self.gateway(),
            self.smtp(),
        ]

    def start(self, services: list[Service], timeout: float = 90.0) -> dict[str, float]:
        """Start all, then wait for each: they boot in parallel."""
        start = time.monotonic()
        for service in services:
            service.daemon.start()
        ready = {}
        for service in services:
            left = max(timeout - (time.monotonic() - start), 1.0)
            service.daemon.wait_ready(service.ready, left, service.daemon.name, interval=0.2)
            ready[service.daemon.name] = time.monotonic() - start
        return ready

    def stop(self, services: list[Service]) -> None:
        for service in reversed(services):
            service.daemon.stop(timeout=20.0)

    def status(self) -> dict[str, str]:
        out = {}
        for service in [self.clickhouse(), *self.app_services()]:
            pid = service.daemon.pid()
            out[service.daemon.name] = f"running pid {pid}" if pid else "stopped"
        return out
