"""WeChat and Telegram wiring from settings: the gateway's callback edges and the
worker's senders (registered in ``kefu/channels.py``). The gateway reads each
tenant's credentials live from the configuration over these (``connectors/gateway.py``);
the worker's senders do when given the configuration it follows (``live``)."""

from __future__ import annotations

from collections.abc import Mapping

import redis.asyncio as aioredis

from connectors.config_log import SecretBox
from connectors.delivery import ChannelSender
from connectors.live_channels import telegram_tokens, wechat_apps
from connectors.telegram import BotFiles, TelegramEdge, TelegramSender
from connectors.wechat import WeChatAccount, WeChatApp, WeChatEdge, WeChatMedia, WeChatSender
from kefu.files import blob_store, url_signer
from kefu.settings import Settings, WeChatAccountSettings
from schemas.config import ConfigState

# WeChat redelivers a callback unanswered after 5 s: the media download inside it is short.
WECHAT_MEDIA_TIMEOUT_CAP_S = 3.0


def _account(s: WeChatAccountSettings) -> WeChatAccount:
    return WeChatAccount(
        token=s.token.get_secret_value(),
        encoding_aes_key=s.encoding_aes_key.get_secret_value(),
        app_id=s.app_id,
        app_secret=s.app_secret.get_secret_value(),  # to download what customers send
    )


def wechat_edge(settings: Settings) -> WeChatEdge:
    c = settings.channels
    return WeChatEdge(
        accounts={t: _account(s.wechat) for t, s in settings.tenants.items() if s.wechat.token},
        mini_programs={
            t: _account(s.wechat_mp) for t, s in settings.tenants.items() if s.wechat_mp.token
        },
        max_body=c.max_body_bytes,
        passive_wait=c.wechat_passive_wait_s,
        max_skew=c.wechat_max_skew_s,
        media=WeChatMedia(c.wechat_api_base, timeout=min(c.timeout_s, WECHAT_MEDIA_TIMEOUT_CAP_S)),
    )


def telegram_edge(settings: Settings) -> TelegramEdge:
    return TelegramEdge(
        secrets={
            t: s.telegram.secret_token.get_secret_value()
            for t, s in settings.tenants.items()
            if s.telegram.bot_token.get_secret_value()
        },
        max_body=settings.channels.max_body_bytes,
        bot_tokens={
            t: s.telegram.bot_token.get_secret_value()
            for t, s in settings.tenants.items()
            if s.telegram.bot_token.get_secret_value()
        },
        # Customers' files, fetched while Telegram waits (it allows a bot 20 MB).
        files=BotFiles(
            settings.channels.telegram_api_base,
            timeout=30.0,
            attempts=settings.channels.attempts,
            backoff=settings.channels.backoff_seconds,
        ),
    )


def chat_senders(
    settings: Settings, live: ConfigState | None = None, box: SecretBox | None = None
) -> dict[str, ChannelSender]:
    c = settings.channels
    tenants = settings.tenants.items()

    def apps(channel: str, found: dict[str, WeChatApp]) -> Mapping[str, WeChatApp]:
        return wechat_apps(found, live, box, channel) if live is not None else found

    bots = {t: s.telegram.bot_token.get_secret_value() for t, s in tenants}
    redis = aioredis.Redis.from_url(settings.redis.dsn)
    # WeChat: replies' files uploaded from the store, or sent as signed links.
    store, signer = blob_store(settings), url_signer(settings)
    return {
        "wechat": WeChatSender(
            apps(
                "wechat",
                {
                    t: WeChatApp(s.wechat.app_id, s.wechat.app_secret.get_secret_value())
                    for t, s in tenants
                },
            ),
            c.wechat_api_base,
            redis=redis,
            passive=c.wechat_passive_wait_s > 0,
            attempts=c.attempts,
            backoff=c.backoff_seconds,
            timeout=c.timeout_s,
            store=store,
            signer=signer,
        ),
        "wechat-mp": WeChatSender(
            apps(
                "wechat_mp",
                {
                    t: WeChatApp(s.wechat_mp.app_id, s.wechat_mp.app_secret.get_secret_value())
                    for t, s in tenants
                },
            ),
            c.wechat_api_base,
            attempts=c.attempts,
            backoff=c.backoff_seconds,
            timeout=c.timeout_s,
            mini_program=True,
            store=store,
            signer=signer,
        ),
        "telegram": TelegramSender(
            telegram_tokens(bots, live, box) if live is not None else bots,
            c.telegram_api_base,
            attempts=c.attempts,
            backoff=c.backoff_seconds,
            timeout=c.timeout_s,
            store=store,
        ),
    }
