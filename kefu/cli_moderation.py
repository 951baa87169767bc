"""``kefu moderation``: word lists on the control topic, and a check from the shell
(registered in kefu/cli.py).

Every change publishes the category's whole list (the topic is compacted: the latest
record per tenant/category is the list); running workers apply it without a restart.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from kefu.settings import Settings, load_settings

TENANT_HELP = "tenant id, or * for the list every tenant without its own uses"


def _settings() -> Settings:
    return load_settings()


def _words_from(path: Path | None, words: tuple[str, ...]) -> list[str]:
    out = list(words)
    if path is not None:
        for line in path.read_text("utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return list(dict.fromkeys(w.strip() for w in out if w.strip()))  # dedupe, keep order


def _names(settings: Settings) -> tuple[str, str]:
    from schemas.topics import TopicNames

    return settings.kafka.servers, TopicNames(settings.topic_prefix).control


def _publish(
    settings: Settings, tenant: str, category: str, action: str, words: list[str], by: str
) -> int:
    from schemas.records import WordListChanged
    from schemas.time import now_ms
    from streams.wordlists import list_key, next_version, publish, read_control

    bootstrap, topic = _names(settings)
    current = asyncio.run(
        read_control(bootstrap, topic, kafka_options=settings.kafka.client_options())
    )
    record = WordListChanged(
        tenant_id=tenant,
        category=category,
        action=action,
        words=words,
        version=next_version(current),
        changed_at=now_ms(),
        changed_by=by,
    )
    try:
        options = settings.kafka.client_options()
        asyncio.run(publish(bootstrap, topic, list_key(tenant, category), record, options))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    return record.version


def _in_force(settings: Settings, tenant: str, category: str) -> tuple[str, list[str]]:
    """(action, words) the tenant has for the category now: its own, else the shared."""
    from streams.moderation import Moderator, WordList
    from streams.wordlists import read_control

    bootstrap, topic = _names(settings)
    current = asyncio.run(
        read_control(bootstrap, topic, kafka_options=settings.kafka.client_options())
    )
    base = WordList.default() if settings.moderation.default_lists else WordList({}, {}, 0)
    moderator = Moderator(base)
    moderator.apply(current.changes())
    lists = moderator.lists()
    found = lists.get(tenant, {}).get(category) or lists["*"].get(category)
    if found is None:
        return "flag", []
    return found.action, list(found.words)


@click.group()
def moderation() -> None:
    """Moderation word lists (live, through the control topic) and checks."""


@moderation.command("set-list")
@click.option("--tenant", required=True, help=TENANT_HELP)
@click.option("--category", required=True, help="e.g. abuse, politics, spam, personal")
@click.option(
    "--action", required=True, type=click.Choice(["block", "mask", "flag", "off"]), help="verdict"
)
@click.option("--words-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--word", "words", multiple=True, help="a word (repeatable)")
@click.option("--by", default="cli", show_default=True, help="who changed it (recorded)")
def set_list(
    tenant: str,
    category: str,
    action: str,
    words_file: Path | None,
    words: tuple[str, ...],
    by: str,
) -> None:
    """Replace a category's whole list for a tenant."""
    wanted = _words_from(words_file, words)
    version = _publish(_settings(), tenant, category, action, wanted, by)
    click.echo(f"{tenant}/{category}: {action}, {len(wanted)} words, version {version}")


@moderation.command("add-words")
@click.option("--tenant", required=True, help=TENANT_HELP)
@click.option("--category", required=True)
@click.option("--action", type=click.Choice(["block", "mask", "flag", "off"]), default=None)
@click.option("--by", default="cli", show_default=True)
@click.argument("words", nargs=-1, required=True)
def add_words(
    tenant: str, category: str, action: str | None, by: str, words: tuple[str, ...]
) -> None:
    """Add words to the list in force (a tenant without its own starts from the shared)."""
    settings = _settings()
    current_action, current = _in_force(settings, tenant, category)
    wanted = _words_from(None, (*current, *words))
    version = _publish(settings, tenant, category, action or current_action, wanted, by)
    click.echo(f"{tenant}/{category}: {len(wanted)} words, version {version}")


@moderation.command("remove-words")
@click.option("--tenant", required=True, help=TENANT_HELP)
@click.option("--category", required=True)
@click.option("--by", default="cli", show_default=True)
@click.argument("words", nargs=-1, required=True)
def remove_words(tenant: str, category: str, by: str, words: tuple[str, ...]) -> None:
    """Remove words from the list in force (as the tenant's own list)."""
    settings = _settings()
    action, current = _in_force(settings, tenant, category)
    gone = set(words)
    wanted = [w for w in current if w not in gone]
    version = _publish(settings, tenant, category, action, wanted, by)
    click.echo(f"{tenant}/{category}: {len(wanted)} words, version {version}")


@moderation.command("delete-list")
@click.option("--tenant", required=True, help=TENANT_HELP)
@click.option("--category", required=True)
def delete_list(tenant: str, category: str) -> None:
    """Remove a tenant's own list (a tombstone): the shared one applies again."""
    from streams.wordlists import list_key, publish

    settings = _settings()
    bootstrap, topic = _names(settings)
    options = settings.kafka.client_options()
    asyncio.run(publish(bootstrap, topic, list_key(tenant, category), None, options))
    click.echo(f"{tenant}/{category}: removed")


@moderation.command("lists")
@click.option("--tenant", default="", help="one tenant's own lists (default: all)")
@click.option("--words", "show_words", is_flag=True, help="print the words too")
def lists(tenant: str, show_words: bool) -> None:
    """The lists in force: the shared ones (*) and each tenant's own."""
    from streams.moderation import Moderator, WordList
    from streams.wordlists import read_control

    settings = _settings()
    bootstrap, topic = _names(settings)
    base = WordList.default() if settings.moderation.default_lists else WordList({}, {}, 0)
    moderator = Moderator(base)
    moderator.apply(
        asyncio.run(
            read_control(bootstrap, topic, kafka_options=settings.kafka.client_options())
        ).changes()
    )
    for owner, categories in moderator.lists().items():
        if tenant and owner not in (tenant, "*"):
            continue
        for category, lst in sorted(categories.items()):
            line = f"{owner}/{category}: {lst.action}, {len(lst.words)} words, v{lst.version}"
            click.echo(line + (f": {', '.join(lst.words)}" if show_words else ""))


@moderation.command("check")
@click.argument("text")
@click.option("--tenant", default="", help="check with this tenant's lists")
@click.option("--offline", is_flag=True, help="only the shipped defaults, no Kafka")
def check(text: str, tenant: str, offline: bool) -> None:
    """Moderate TEXT as a worker would and print the verdict as JSON."""
    from streams.moderation import Moderator, WordList
    from streams.wordlists import read_control

    settings = _settings()
    m = settings.moderation
    base = WordList.default() if m.default_lists else WordList({}, {}, 0)
    moderator = Moderator(base, personal_data=m.personal_data)
    if not offline:
        bootstrap, topic = _names(settings)
        try:
            moderator.apply(
                asyncio.run(
                    read_control(bootstrap, topic, 10.0, settings.kafka.client_options())
                ).changes()
            )
        except Exception as exc:  # no broker: say so rather than judge with stale lists
            raise click.ClickException(f"cannot read the word lists ({exc!r}); --offline?") from exc
    verdict = moderator.check(text, tenant)
    click.echo(
        json.dumps(
            {
                "action": verdict.action,
                "text": verdict.text,
                "categories": list(verdict.categories),
                "list_version": verdict.list_version,
            },
            ensure_ascii=False,
        )
    )
