"""Outbound channel senders, wired from settings: one entry per channel module in
``connectors/`` (web chat and REST webhooks are built into ``ChannelDeliverer``)."""

from __future__ import annotations

from connectors.config_log import SecretBox
from connectors.delivery import ChannelSender
from kefu.chat_channels import chat_senders
from kefu.cli_email import email_sender
from kefu.settings import Settings
from schemas.config import ConfigState


def channel_senders(
    settings: Settings, live: ConfigState | None = None, box: SecretBox | None = None
) -> dict[str, ChannelSender]:
    senders: dict[str, ChannelSender] = {}
    # Channels register here, one line each: senders["<channel>"] = <Sender>(settings…)
    senders["email"] = email_sender(settings, live)  # From addresses live from /admin
    senders.update(chat_senders(settings, live, box))  # wechat, wechat-mp, telegram
    return senders
