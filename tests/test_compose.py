"""docker-compose.yml, the production shape: a valid Compose file, published on loopback
only, whose kefu services are configured with settings that exist.

No Docker engine is needed: ``docker-compose config`` validates and resolves the file
offline (scripts/ensure-system.sh installs docker-compose). The resolved config is read
as JSON where the tool can print it (Compose v2); Compose v1 prints YAML only, which is
read with PyYAML, from this interpreter or else from the one docker-compose runs on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
from pydantic import BaseModel

from kefu.cli import main as cli
from kefu.settings import KafkaSettings, Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
SERVICES = {
    "kafka",
    "kafka-2",
    "kafka-3",
    "redis",
    "clickhouse",
    "topics",
    "projector",
    "worker",
    "gateway",
    "smtp",
}
KEFU_SERVICES = {"topics", "projector", "worker", "gateway", "smtp"}
LOOPBACK = "127.0.0.1"
YAML_TO_JSON = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"

Config = dict[str, Any]


# ------------------------------------------------------------------------ running it


def _compose() -> list[str]:
    exe = shutil.which("docker-compose")
    if exe:
        return [exe]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    pytest.fail("docker-compose is not installed: run scripts/ensure-system.sh (or `make setup`)")


def _run(
    *args: str, stdin: str | None = None, command: list[str] | None = None
) -> subprocess.CompletedProcess[str]:
    # The defaults as the file states them: no .env, no COMPOSE_* or interpolated
    # variables from the caller's shell.
    env = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "LANG", "LC_ALL"}}
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.env"
        empty.touch()
        argv = command or [*_compose(), "--env-file", str(empty), "-f", str(COMPOSE_FILE), *args]
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
        )


def _yaml_to_json(text: str) -> Config:
    try:
        import yaml  # type: ignore[import-untyped, unused-ignore]  # not a dependency
    except ImportError:
        pass
    else:
        loaded: Config = yaml.safe_load(text)
        return loaded
    # docker-compose v1 is a Python program with PyYAML: use its interpreter.
    exe = _compose()[0]
    with open(exe, "rb") as f:
        first = f.readline().decode("utf-8", "replace")
    if first.startswith("#!") and "python" in first:
        interpreter = first[2:].strip().split()
        done = _run(stdin=text, command=[*interpreter, "-c", YAML_TO_JSON])
        if done.returncode == 0:
            parsed: Config = json.loads(done.stdout)
            return parsed
    pytest.fail("no YAML parser for `docker-compose config` output (install PyYAML)")


@pytest.fixture(scope="module")
def config() -> Iterator[Config]:
    """The resolved Compose config (interpolated, anchors merged)."""
    done = _run("config", "--format", "json")
    if done.returncode == 0 and done.stdout.lstrip().startswith("{"):
        yield json.loads(done.stdout)
        return
    done = _run("config")
    assert done.returncode == 0, done.stderr
    yield _yaml_to_json(done.stdout)


def _environment(service: Config) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


# ----------------------------------------------------------------------- settings map


def _model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def settings_path_error(name: str) -> str | None:
    """Why ``KEFU_A__B`` names no field of Settings (``a``, then ``b`` of its model), or
    None when it does. Matching is case-insensitive, as in pydantic-settings."""
    parts = name.removeprefix("KEFU_").lower().split("__")
    model: type[BaseModel] = Settings
    i = 0
    while i < len(parts):
        field = model.model_fields.get(parts[i])
        if field is None:
            return f"{name}: no field {parts[i]!r} in {model.__name__}"
        i += 1
        if i == len(parts):
            return None
        nested = _model(field.annotation)
        if nested is None and typing.get_origin(field.annotation) is dict:
            # dict[str, Model]: the next part is a key (a tenant id), then the model's field.
            nested = _model(typing.get_args(field.annotation)[1])
            i += 1
            if i == len(parts):
                return None
        if nested is None:
            return f"{name}: {parts[i - 1]!r} of {model.__name__} has no nested fields"
        model = nested
    return None


def test_settings_path_error_walks_nested_models() -> None:
    assert settings_path_error("KEFU_STATE_DIR") is None
    assert settings_path_error("KEFU_KAFKA__BOOTSTRAP") is None
    assert settings_path_error("KEFU_TENANTS__DEMO__API_KEY") is None
    assert settings_path_error("KEFU_STATEDIR") is not None
    assert settings_path_error("KEFU_KAFKA__BOOTSTRAP_SERVERS") is not None
    assert settings_path_error("KEFU_LOG_LEVEL__X") is not None


# --------------------------------------------------------------------------- the file


def test_compose_file_is_valid() -> None:
    done = _run("config", "-q")
    assert done.returncode == 0, done.stderr


def test_the_production_services_are_there(config: Config) -> None:
    assert set(config["services"]) >= SERVICES


def test_published_ports_bind_loopback_only(config: Config) -> None:
    published = []
    for name, service in config["services"].items():
        assert service.get("network_mode") != "host", f"{name} shares the host's network"
        for port in service.get("ports") or []:
            if isinstance(port, dict):  # long syntax (Compose v2's output)
                host_ip = port.get("host_ip", "")
            else:  # "HOST_IP:PUBLISHED:TARGET[/proto]"
                parts = str(port).split(":")
                host_ip = parts[0] if len(parts) == 3 else ""
            assert host_ip == LOOPBACK, f"{name} publishes {port} beyond loopback"
            published.append(name)
    assert {"gateway", "smtp"} <= set(published)


def test_every_kefu_variable_is_a_setting(config: Config) -> None:
    errors = []
    names = set()
    for service in config["services"].values():
        for name in _environment(service):
            if name.startswith("KEFU_"):
                names.add(name)
                errors.append(settings_path_error(name))
    assert names, "no KEFU_ variables at all"
    assert [e for e in errors if e] == []


@pytest.mark.parametrize("name", sorted(KEFU_SERVICES))
def test_kefu_service_environment_loads_into_settings(
    config: Config, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = config["services"][name]
    assert service["command"][0] in cli.commands, f"{name}: no such kefu command"
    for var in list(os.environ):
        if var.upper().startswith("KEFU_"):
            monkeypatch.delenv(var)
    for var, value in _environment(service).items():
        monkeypatch.setenv(var, value)
    settings = Settings()
    # Everything external: nothing embedded, nothing on the container's loopback.
    assert settings.kafka.servers == "kafka:9092,kafka-2:9092,kafka-3:9092"
    assert settings.redis.dsn.startswith("redis://redis:")
    assert not settings.embedded_clickhouse
    assert settings.tenants
    if name == "gateway":
        assert settings.gateway.host == "0.0.0.0"
    if name == "smtp":  # reachable in the network; published on loopback (above)
        assert settings.email.host == "0.0.0.0"


def test_clickhouse_url_carries_the_servers_credentials(config: Config) -> None:
    server = _environment(config["services"]["clickhouse"])
    url = urlparse(_environment(config["services"]["projector"])["KEFU_CLICKHOUSE__URL"])
    assert url.hostname == "clickhouse"
    assert unquote(url.username or "") == server["CLICKHOUSE_USER"]
    assert unquote(url.password or "") == server["CLICKHOUSE_PASSWORD"]


def test_kafka_is_the_embedded_stacks_broker(config: Config) -> None:
    kafka = config["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{KafkaSettings().version}"
    env = _environment(kafka)
    assert "broker" in env["KAFKA_PROCESS_ROLES"] and "controller" in env["KAFKA_PROCESS_ROLES"]
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_bind_mounted_files_exist(config: Config) -> None:
    for name, service in config["services"].items():
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                source = volume.get("source", "") if volume.get("type") == "bind" else ""
            else:
                source = str(volume).split(":", 1)[0]
            if source.startswith("/") or source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
