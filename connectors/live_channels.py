"""Channel credentials and the webhook target, live from the configuration.

An administrator's ``channel`` entities (``wechat``, ``wechat_mp``, ``telegram``) and
``webhook`` entity (``schemas/config.py``) are read at each callback and each send, so
a change in /admin takes effect at the next message, with no restart. The settings
stay the fallback: field by field, a value set in the configuration wins, an unset one
comes from the environment. Secret fields are opened with the :class:`SecretBox` of
the process (a value that does not open is taken as unset, and logged).

The views are ``Mapping[str, V]`` (tenant -> credentials), what the edges and senders
already take (``WeChatEdge.accounts``, ``TelegramEdge.secrets``, ``TelegramSender``'s
tokens, ``ChannelDeliverer``'s webhooks): they are built once per entity version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import httpx

from connectors.accounts import secret_context
from connectors.config_log import SecretBox
from connectors.delivery import WebhookTarget
from connectors.telegram import TelegramEdge
from connectors.wechat import AccessTokens, WeChatAccount, WeChatApp, WeChatEdge, WeChatError
from schemas.config import SINGLE, ConfigState, is_secret

log = logging.getLogger(__name__)
V = TypeVar("V")


def opened(
    state: ConfigState, box: SecretBox | None, tenant: str, kind: str, entity_id: str
) -> dict[str, Any]:
    """The entity's fields with its secrets in clear ({} when it has none). A secret
    that does not open (no key, another key) is left out, so the fallback applies."""
    data = state.get(tenant, kind, entity_id) or {}
    out: dict[str, Any] = {}
    for name, value in data.items():
        if not is_secret(name):
            out[name] = value
            continue
        if isinstance(value, str):  # a plain seed value: nothing to open
            out[name] = value
            continue
        if box is None:
            log.warning("config %s/%s/%s: no key to open %s", tenant, kind, entity_id, name)
            continue
        try:
            out[name] = box.open(value, f"{secret_context(tenant, kind, entity_id)}/{name}")
        except Exception as exc:  # a wrong key or a damaged value: the setting applies
            log.warning(
                "config %s/%s/%s: %s does not open: %s",
                tenant,
                kind,
                entity_id,
                name,
                type(exc).__name__,
            )
    return out


def _field(config: Mapping[str, Any], name: str, fallback: str) -> str:
    value = config.get(name)
    return value if isinstance(value, str) and value else fallback


class LiveView(Mapping[str, V]):
    """tenant -> ``build(config fields, the fallback's value)``, the config entity
    ``(kind, entity_id)`` read live; the fallback's value alone when the tenant has no
    such entity. ``build`` returns None for "not configured"."""

    def __init__(
        self,
        state: ConfigState,
        box: SecretBox | None,
        kind: str,
        entity_id: str,
        fallback: Mapping[str, V],
        build: Callable[[Mapping[str, Any], V | None], V | None],
    ) -> None:
        self._state = state
        self._box = box
        self._kind = kind
        self._entity_id = entity_id
        self._fallback = fallback
        self._build = build
        self._built: dict[str, tuple[int, V | None]] = {}  # tenant -> (version, value)

    def _value(self, tenant: str) -> V | None:
        version = self._state.version(tenant, self._kind, self._entity_id)
        if not version:
            return self._fallback.get(tenant)
        cached = self._built.get(tenant)
        if cached is not None and cached[0] == version:
            return cached[1]
        fields = opened(self._state, self._box, tenant, self._kind, self._entity_id)
        value = self._build(fields, self._fallback.get(tenant))
        self._built[tenant] = (version, value)
        return value

    def __getitem__(self, tenant: str) -> V:
        value = self._value(tenant)
        if value is None:
            raise KeyError(tenant)
        return value

    def __iter__(self) -> Iterator[str]:
        configured = {
            t for (t, k, e) in self._state.entities if k == self._kind and e == self._entity_id
        }
        return iter(sorted(t for t in set(self._fallback) | configured if self._value(t)))

    def __len__(self) -> int:
        return sum(1 for _ in self)


# ------------------------------------------------------------------------ WeChat


def _wechat_account(config: Mapping[str, Any], env: WeChatAccount | None) -> WeChatAccount | None:
    env = env or WeChatAccount(token="")
    account = WeChatAccount(
        token=_field(config, "token", env.token),
        encoding_aes_key=_field(config, "encoding_aes_key", env.encoding_aes_key),
        app_id=_field(config, "app_id", env.app_id),
        app_secret=_field(config, "app_secret", env.app_secret),
    )
    return account if account.token or account.app_id else None


def _wechat_app(config: Mapping[str, Any], env: WeChatApp | None) -> WeChatApp | None:
    env = env or WeChatApp("", "")
    app = WeChatApp(
        _field(config, "app_id", env.app_id), _field(config, "app_secret", env.app_secret)
    )
    return app if app.app_id or app.app_secret else None


def live_wechat(edge: WeChatEdge, state: ConfigState, box: SecretBox | None) -> WeChatEdge:
    """The gateway's WeChat edge with its accounts (callback token, AES key, app id and
    secret) read from the config, the edge's own (the settings') as fallback."""
    return dataclasses.replace(
        edge,
        accounts=LiveView(state, box, "channel", "wechat", edge.accounts, _wechat_account),
        mini_programs=LiveView(
            state, box, "channel", "wechat_mp", edge.mini_programs, _wechat_account
        ),
    )


def wechat_apps(
    fallback: Mapping[str, WeChatApp],
    state: ConfigState,
    box: SecretBox | None,
    channel: str = "wechat",
) -> Mapping[str, WeChatApp]:
    """The worker's WeChat apps (``channel``: wechat or wechat_mp), live."""
    return LiveView(state, box, "channel", channel, fallback, _wechat_app)


# ---------------------------------------------------------------------- Telegram


def _bot_token(config: Mapping[str, Any], env: str | None) -> str | None:
    return _field(config, "bot_token", env or "") or None


def live_telegram(edge: TelegramEdge, state: ConfigState, box: SecretBox | None) -> TelegramEdge:
    """The gateway's Telegram edge with each tenant's bot token and secret token read
    from the config, the edge's own as fallback. A secret token counts only beside a
    bot token (no bot, no webhook), as the settings' edge has it."""
    tokens = LiveView(state, box, "channel", "telegram", edge.bot_tokens, _bot_token)
    return dataclasses.replace(
        edge, bot_tokens=tokens, secrets=_TelegramSecrets(state, box, edge, tokens)
    )


class _TelegramSecrets(Mapping[str, str]):
    """tenant -> the webhook's secret token: the config's, else the settings'; only for
    a tenant with a bot token (config or settings)."""

    def __init__(
        self,
        state: ConfigState,
        box: SecretBox | None,
        edge: TelegramEdge,
        tokens: Mapping[str, str],
    ) -> None:
        self._tokens = tokens
        self._view: LiveView[str] = LiveView(
            state,
            box,
            "channel",
            "telegram",
            edge.secrets,
            lambda config, env: _field(config, "secret_token", env or "") or None,
        )

    def __getitem__(self, tenant: str) -> str:
        if not self._tokens.get(tenant):
            raise KeyError(tenant)
        return self._view[tenant]

    def __iter__(self) -> Iterator[str]:
        return iter([t for t in self._view if self._tokens.get(t)])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def telegram_tokens(
    fallback: Mapping[str, str], state: ConfigState, box: SecretBox | None
) -> Mapping[str, str]:
    """The worker's bot tokens, live."""
    return LiveView(state, box, "channel", "telegram", fallback, _bot_token)


# ----------------------------------------------------------------------- webhook


def _webhook(config: Mapping[str, Any], env: WebhookTarget | None) -> WebhookTarget | None:
    url = _field(config, "url", env.url if env else "")
    secret = config.get("secret")
    key = secret.encode() if isinstance(secret, str) and secret else (env.secret if env else b"")
    return WebhookTarget(url, key) if url else None


def live_webhooks(
    fallback: Mapping[str, WebhookTarget], state: ConfigState, box: SecretBox | None
) -> Mapping[str, WebhookTarget]:
    """tenant -> where its REST replies are POSTed and the key that signs them: the
    config's ``webhook`` entity (url, sealed secret) over the settings'."""
    return LiveView(state, box, "webhook", SINGLE, fallback, _webhook)


# ------------------------------------------------------------- the admin's check

TEST_TEXT = "kefu: a test message (the channel works)."
CHECK_TIMEOUT_S = 5.0


async def check_channel(
    wechat: WeChatEdge,
    telegram: TelegramEdge,
    tenant: str,
    channel: str,
    to: str = "",
) -> dict[str, Any]:
    """Try a channel's credentials as the gateway and workers use them now (the
    configuration's, else the settings'): Telegram ``getMe``, WeChat an access token;
    with ``to`` (a chat id, an openid) a test message is sent there too. Never raises
    for the platform's answer: ``{"ok": False, "error": ...}`` says what went wrong
    (no secret in it)."""
    async with httpx.AsyncClient(timeout=CHECK_TIMEOUT_S) as http:
        if channel == "telegram":
            return await _check_telegram(http, telegram, tenant, to)
        return await _check_wechat(http, wechat, tenant, channel == "wechat_mp", to)


async def _check_telegram(
    http: httpx.AsyncClient, edge: TelegramEdge, tenant: str, to: str
) -> dict[str, Any]:
    token = edge.bot_tokens.get(tenant, "")
    if not token:
        return {"ok": False, "error": "no bot token set"}
    if edge.files is None:
        return {"ok": False, "error": "no Telegram API configured"}
    base = f"{edge.files.api_base}/bot{token}"
    try:
        answer = await http.get(f"{base}/getMe")
        me = answer.json() if answer.status_code < 300 else {}
        result = me.get("result") if isinstance(me, dict) else None
        if not isinstance(result, dict):
            return {"ok": False, "error": f"getMe: {_described(answer)}"}
        out: dict[str, Any] = {"ok": True, "bot": result.get("username") or result.get("id")}
        out["webhook_secret_set"] = bool(edge.secrets.get(tenant))
        if to:
            chat: int | str = int(to) if to.lstrip("-").isdigit() else to
            sent = await http.post(f"{base}/sendMessage", json={"chat_id": chat, "text": TEST_TEXT})
            out["sent"] = sent.status_code < 300
            if not out["sent"]:
                out.update(ok=False, error=f"sendMessage: {_described(sent)}")
        return out
    except (httpx.HTTPError, ValueError) as exc:  # the URL holds the token: never shown
        return {"ok": False, "error": f"Telegram unreachable: {type(exc).__name__}"}


async def _check_wechat(
    http: httpx.AsyncClient, edge: WeChatEdge, tenant: str, mini: bool, to: str
) -> dict[str, Any]:
    account = (edge.mini_programs if mini else edge.accounts).get(tenant)
    if account is None or not account.app_id or not account.app_secret:
        return {"ok": False, "error": "no app id and app secret set"}
    if edge.media is None:
        return {"ok": False, "error": "no WeChat API configured"}
    base = edge.media.api_base
    try:
        token = await AccessTokens(base).get(http, account.app)
        out: dict[str, Any] = {"ok": True, "app_id": account.app_id}
        out["callback_token_set"] = bool(account.token)
        if to:
            body = {"touser": to, "msgtype": "text", "text": {"content": TEST_TEXT}}
            sent = await http.post(
                f"{base}/cgi-bin/message/custom/send",
                params={"access_token": token},
                content=json.dumps(body, ensure_ascii=False).encode(),
                headers={"Content-Type": "application/json"},
            )
            answer = sent.json() if sent.status_code < 300 else {"errcode": sent.status_code}
            code = answer.get("errcode", 0) if isinstance(answer, dict) else -1
            out["sent"] = code == 0
            if code:
                out.update(ok=False, error=f"custom/send: errcode {code}")
        return out
    except WeChatError as exc:  # the token endpoint: wrong secret, unknown app, busy
        return {"ok": False, "error": str(exc)}
    except (httpx.HTTPError, ValueError) as exc:
        return {"ok": False, "error": f"WeChat unreachable: {type(exc).__name__}"}


def _described(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        data = None
    description = data.get("description") if isinstance(data, dict) else None
    if isinstance(description, str) and description:
        return description[:200]
    return f"HTTP {response.status_code}"
