"""Handing settings to child processes, and logging setup shared by every process."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from kefu.settings import Settings


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value.absolute())
    return value


def settings_env(settings: Settings) -> dict[str, str]:
    """``KEFU_*`` variables that rebuild these exact settings in a child process."""
    env = {}
    for name in type(settings).model_fields:
        value = _plain(getattr(settings, name))
        env[f"KEFU_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


def configure_logging(level: str) -> None:
    # Structured enough to grep: time, level, logger, message. Never message text:
    # modules log positions and ids only.
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    # httpx logs every request's URL at INFO: Telegram's carry the bot token (and file
    # downloads put it in more of them), WeChat's the access token.
    logging.getLogger("httpx").setLevel(logging.WARNING)
