"""Outbound channel senders, wired from settings: one entry per channel module in
``connectors/`` (web chat and REST webhooks are built into ``ChannelDeliverer``)."""

from __future__ import annotations

from connectors.delivery import ChannelSender
from kefu.chat_channels import chat_senders
from kefu.cli_email import email_sender
from kefu.settings import Settings


def channel_senders(settings: Settings) -> dict[str, ChannelSender]:
    senders: dict[str, ChannelSender] = {}
    # Channels register here, one line each: senders["<channel>"] = <Sender>(settings…)
    senders["email"] = email_sender(settings)
    senders.update(chat_senders(settings))  # wechat, wechat-mp, telegram
    return senders
