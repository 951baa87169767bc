"""Moderation, as the conversation agent sees it: text in, a verdict out. Pure.

This is the skeleton: a per-category word list matched case-insensitively, with an
action per category. The moderation issue replaces the matcher (normalisation,
Aho-Corasick, live list updates) behind the same ``check``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

ACTION_ORDER = ("pass", "flag", "mask", "block")  # a stronger action wins


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str
    text: str
    categories: tuple[str, ...] = ()
    list_version: int = 0


@dataclass(frozen=True, slots=True)
class WordList:
    words: Mapping[str, tuple[str, ...]]  # category -> words
    actions: Mapping[str, str]  # category -> block | mask | flag
    version: int = 1


DEFAULT_LIST = WordList(
    words={
        "abuse": ("idiot", "stupid bot", "傻逼"),
        "spam": ("buy followers", "加微信"),
    },
    actions={"abuse": "mask", "spam": "flag"},
)


@dataclass(slots=True)
class Moderator:
    word_list: WordList = DEFAULT_LIST
    _patterns: dict[str, re.Pattern[str]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for category, words in self.word_list.words.items():
            alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
            self._patterns[category] = re.compile(alternatives, re.IGNORECASE)

    def check(self, text: str, tenant_id: str = "") -> Verdict:
        action = "pass"
        categories: list[str] = []
        masked = text
        for category, pattern in self._patterns.items():
            if not pattern.search(text):
                continue
            categories.append(category)
            category_action = self.word_list.actions.get(category, "flag")
            if category_action == "mask":
                masked = pattern.sub(lambda m: "*" * len(m.group()), masked)
            if ACTION_ORDER.index(category_action) > ACTION_ORDER.index(action):
                action = category_action
        return Verdict(action, masked, tuple(categories), self.word_list.version)
