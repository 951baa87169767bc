"""Moderation, as the conversation agent sees it: text in, a verdict out. Pure.

Per tenant, a set of categories, each with an action (block > mask > flag; ``off``
disables it) and words. The shipped defaults (``moderation_data/default.json``) apply
to every tenant; the control topic (``streams.wordlists``) replaces a category for
all tenants (tenant ``*``) or for one, live, through :meth:`Moderator.apply`.

Matching runs on the normalised text (``streams.normalize``) with one Aho-Corasick
automaton for the shared lists and one per tenant with lists of its own. ``check`` is
native (``streams/_native/moderation.c``, built by ``pip install -e .``): one pass over
the text normalises each character through ``normalize.table()``, steps the automata,
keeps each normalised character's original index (so a hit is a span of the original
text at once), applies the word boundaries, pre-checks personal data and counts the
spam signals; a message that matches nothing is one C call, and so is one with word
hits only. The Python implementation (``str.translate`` + ahocorasick-rs, positions
and boundaries only for a hit) stays as the reference the native path is tested
against (``check_reference``, ``Moderator(native=False)``) and as the fallback when the
extension is not built. Besides words, two categories have detectors: ``personal`` (Chinese
mobile and international phone numbers, Chinese ID card numbers with their check
digit, e-mail addresses, bank cards passing Luhn) and ``spam`` (the same message
repeated, or links flooding in, by the same sender: see :func:`sender_entry`).

Actions: ``mask`` replaces each matched span of the original text with as many ``*``;
``flag`` delivers the text unchanged (the MessageModerated event records it); ``block``
records the text with every hit masked, and the lifecycle emits nothing after the
MessageModerated event: no routing, no reply request (inbound), no ReplyProduced
(outbound). Telling the sender is the connectors' part, from that event
(``verdict == "block"``; direction ``in``: the customer, ``out``: the agent or AI).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import NamedTuple, Protocol

import ahocorasick_rs

from streams.normalize import (
    char_flags,
    code_table,
    is_word_char,
    normalize,
    offsets,
    table,
)

try:  # the C hot path (streams/_native/moderation.c), built by `pip install -e .`
    from streams import _moderation_c as _native
except ImportError:  # not built: the Python reference below does the same, slower
    _native = None  # type: ignore[assignment]

ACTION_ORDER = ("pass", "flag", "mask", "block")  # a stronger action wins
ACTIONS = ("block", "mask", "flag", "off")
ALL_TENANTS = "*"  # a list for every tenant without one of its own
PERSONAL = "personal"  # the category of the personal-data detectors
SPAM = "spam"  # the category of the per-sender spam signals
CATEGORY_RE = re.compile(r"[a-z][a-z0-9_-]{0,39}")

# (occurred_at ms, fingerprint of the normalised text, links in it): what a
# conversation remembers of its customer's recent messages for the spam signals.
SenderEntry = tuple[int, int, int]
RECENT_SIZE = 8


class Verdict(NamedTuple):
    """Immutable; a NamedTuple because one is built per message, at half the cost of
    a frozen dataclass."""

    action: str
    text: str
    categories: tuple[str, ...] = ()
    list_version: int = 0


class Moderates(Protocol):
    """What the conversation agent calls. For a customer's message, ``recent`` holds
    the sender's recent messages (from the conversation's state) and ``now`` the
    message's time; replies pass neither and get no spam signals."""

    def check(
        self,
        text: str,
        tenant_id: str = "",
        *,
        recent: Sequence[SenderEntry] | None = None,
        now: int = 0,
    ) -> Verdict: ...


@dataclass(frozen=True, slots=True)
class WordList:
    """A whole set of lists: the shipped defaults, or a test's own."""

    words: Mapping[str, tuple[str, ...]]  # category -> words
    actions: Mapping[str, str]  # category -> block | mask | flag | off
    version: int = 1

    @classmethod
    def default(cls) -> WordList:
        raw = json.loads(
            (resources.files("streams") / "moderation_data" / "default.json").read_text("utf-8")
        )
        categories = raw["categories"]
        return cls(
            words={c: tuple(v["words"]) for c, v in categories.items()},
            actions={c: v["action"] for c, v in categories.items()},
            version=int(raw["version"]),
        )


@dataclass(frozen=True, slots=True)
class CategoryList:
    """One category's list for one tenant (or ``*``): the unit the control topic carries."""

    tenant_id: str
    category: str
    action: str
    words: tuple[str, ...]
    version: int


@dataclass(frozen=True, slots=True)
class ListRemoved:
    """A tenant's own list for a category is gone: the shared one applies again."""

    tenant_id: str
    category: str


ListChange = CategoryList | ListRemoved


@dataclass(frozen=True, slots=True)
class SpamLimits:
    repeats: int = 3  # the same text this many times within the window is spam
    repeat_window_ms: int = 600_000
    links: int = 3  # this many links within the window (this message included)
    link_window_ms: int = 60_000


def validate(change: CategoryList) -> None:
    if not CATEGORY_RE.fullmatch(change.category):
        raise ValueError(f"category must match {CATEGORY_RE.pattern}: {change.category!r}")
    if change.action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}: {change.action!r}")
    if not change.tenant_id or "/" in change.tenant_id:
        raise ValueError(f"bad tenant id {change.tenant_id!r}")


# --------------------------------------------------------------------- matching


@dataclass(frozen=True, slots=True)
class _Entry:
    category: str
    left_boundary: bool  # a Latin word: the character before must not be a letter/digit
    right_boundary: bool
    has_letters: bool  # letters in the word: a hit made of separated digits is a number


@dataclass(frozen=True, slots=True)
class _Matcher:
    automaton: ahocorasick_rs.AhoCorasick | None
    entries: tuple[tuple[_Entry, ...], ...]  # per pattern index
    # The same patterns and entries for the one-pass native check (None: Python only).
    compiled: _native.Automaton | None = None

    @classmethod
    def build(cls, lists: Iterable[CategoryList], *, with_native: bool = True) -> _Matcher:
        patterns: dict[str, dict[_Entry, None]] = {}
        for lst in lists:
            if lst.action == "off":
                continue
            for word in lst.words:
                parsed = _parse_word(word, lst.category)
                if parsed is not None:
                    patterns.setdefault(parsed[0], {})[parsed[1]] = None
        if not patterns:
            return cls(None, ())
        # Contiguous NFA over DFA: measured faster here on a 10,000-word list (the
        # DFA's larger tables miss the CPU cache), and quicker to build.
        automaton = ahocorasick_rs.AhoCorasick(
            list(patterns), implementation=ahocorasick_rs.Implementation.ContiguousNFA
        )
        entries = tuple(tuple(e) for e in patterns.values())
        return cls(automaton, entries, _native_automaton(patterns, entries, with_native))


def _native_automaton(
    patterns: Iterable[str], entries: tuple[tuple[_Entry, ...], ...], with_native: bool
) -> _native.Automaton | None:
    if _native is None or not with_native:
        return None
    categories = tuple(sorted({e.category for es in entries for e in es}))
    index = {c: i for i, c in enumerate(categories)}
    return _native.Automaton(
        list(patterns),
        [[(index[e.category], _entry_flags(e)) for e in es] for es in entries],
        categories,
    )


def _entry_flags(e: _Entry) -> int:
    assert _native is not None
    return (
        (_native.E_LEFT if e.left_boundary else 0)
        | (_native.E_RIGHT if e.right_boundary else 0)
        | (_native.E_LETTERS if e.has_letters else 0)
    )


def _parse_word(word: str, category: str) -> tuple[str, _Entry] | None:
    word = word.strip()
    core = word.strip("*")
    pattern = normalize(core)
    if not pattern:
        return None
    entry = _Entry(
        category,
        left_boundary=not word.startswith("*") and _latin(pattern[0]),
        right_boundary=not word.endswith("*") and _latin(pattern[-1]),
        has_letters=any(c.isalpha() for c in core),
    )
    return pattern, entry


def _latin(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


_Search = tuple[ahocorasick_rs.AhoCorasick, tuple[tuple[_Entry, ...], ...], frozenset[str]]


@dataclass(frozen=True, slots=True)
class _View:
    """Everything ``check`` needs for one tenant, immutable: swapped whole on a change."""

    # (automaton, entries per pattern, categories whose hits a tenant's own list replaces)
    matchers: tuple[_Search, ...]
    actions: Mapping[str, str]
    version: int
    personal: str  # the personal-data action, "off" for none
    spam: str
    # The view's native scanner (None: the Python reference only).
    scanner: _native.Scanner | None = None


@dataclass(frozen=True, slots=True)
class _Snapshot:
    shared: _View
    tenants: Mapping[str, _View]


# ------------------------------------------------------------------ the moderator


class _Check(Protocol):
    def __call__(
        self,
        text: str,
        tenant_id: str = "",
        *,
        recent: Sequence[SenderEntry] | None = None,
        now: int = 0,
    ) -> Verdict: ...


@dataclass(slots=True)
class Moderator:
    """Lists per tenant, updated live by :meth:`apply`; ``check`` is pure per call.

    ``check(text, tenant_id="", *, recent=None, now=0) -> Verdict`` is an attribute: the
    native dispatcher (streams/_native/moderation.c: the tenant's scanner normalises,
    matches, pre-checks personal data and counts the spam signals in one pass, and
    builds the "pass" verdict; anything else comes back to :func:`_found`), or, when
    the extension is not built or ``native=False``, :meth:`check_reference`."""

    word_list: WordList = field(default_factory=WordList.default)
    personal_data: bool = True
    spam: SpamLimits = field(default_factory=SpamLimits)
    native: bool = True  # the C one-pass check when built; False: the Python reference
    _lists: dict[tuple[str, str], CategoryList] = field(default_factory=dict, init=False)
    _shared_matcher: _Matcher = field(init=False)
    _tenant_matchers: dict[str, _Matcher] = field(default_factory=dict, init=False)
    _snapshot: _Snapshot = field(init=False)
    _table: list[int | None] = field(init=False, repr=False)
    _dispatch: _native.Dispatch | None = field(default=None, init=False, repr=False)
    check: _Check = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._table = table()  # built once per process, now rather than on a message
        self._shared_matcher = self._build(self._shared_lists().values())
        self._snapshot = self._views()
        self.check = self.check_reference
        self._publish()

    def _publish(self) -> None:
        """Hand the snapshot's scanners to the native dispatcher (one swap)."""
        snap = self._snapshot
        if snap.shared.scanner is None:
            return
        scanners = {t: v.scanner for t, v in snap.tenants.items() if v.scanner is not None}
        if self._dispatch is None:
            self._dispatch = _native.Dispatch(snap.shared.scanner, scanners)
            self.check = self._dispatch
        else:
            self._dispatch.update(snap.shared.scanner, scanners)

    def _build(self, lists: Iterable[CategoryList]) -> _Matcher:
        return _Matcher.build(lists, with_native=self.native)

    @property
    def uses_native(self) -> bool:
        return self._dispatch is not None

    # -- updates

    def apply(self, changes: Iterable[ListChange]) -> set[str]:
        """Apply list changes (in log order); return the tenants they touched."""
        # Copy on write: the worker applies in a thread while checks read the snapshot.
        lists = dict(self._lists)
        touched: set[str] = set()
        for change in changes:
            key = (change.tenant_id, change.category)
            if isinstance(change, CategoryList):
                validate(change)
                current = lists.get(key)
                if current is not None and current.version > change.version:
                    continue  # an older list published late: the newer one stays
                lists[key] = change
            else:
                lists.pop(key, None)
            touched.add(change.tenant_id)
        if not touched:
            return touched
        self._lists = lists
        if ALL_TENANTS in touched:
            self._shared_matcher = self._build(self._shared_lists().values())
        matchers = dict(self._tenant_matchers)
        for tenant in touched - {ALL_TENANTS}:
            own = [lst for (t, _), lst in lists.items() if t == tenant]
            if own:
                matchers[tenant] = self._build(own)
            else:
                matchers.pop(tenant, None)
        self._tenant_matchers = matchers
        self._snapshot = self._views()  # one assignment: a check sees old or new
        self._publish()
        return touched

    def _shared_lists(self) -> dict[str, CategoryList]:
        base = self.word_list
        lists = {
            category: CategoryList(
                ALL_TENANTS, category, base.actions.get(category, "flag"), words, base.version
            )
            for category, words in base.words.items()
        }
        for category, action in base.actions.items():
            lists.setdefault(category, CategoryList(ALL_TENANTS, category, action, (), 0))
        for (tenant, category), lst in self._lists.items():
            if tenant == ALL_TENANTS:
                lists[category] = lst
        return lists

    def _views(self) -> _Snapshot:
        shared_lists = self._shared_lists()
        shared_version = max((lst.version for lst in shared_lists.values()), default=0)
        shared_version = max(shared_version, self.word_list.version)
        shared = self._view(
            ((self._shared_matcher, frozenset()),),
            {c: lst.action for c, lst in shared_lists.items()},
            shared_version,
        )
        tenants: dict[str, _View] = {}
        for tenant, matcher in self._tenant_matchers.items():
            own = {c: lst for (t, c), lst in self._lists.items() if t == tenant}
            tenants[tenant] = self._view(
                ((self._shared_matcher, frozenset(own)), (matcher, frozenset())),
                {**shared.actions, **{c: lst.action for c, lst in own.items()}},
                max(shared_version, *(lst.version for lst in own.values())),
            )
        return _Snapshot(shared, tenants)

    def _view(
        self,
        matchers: tuple[tuple[_Matcher, frozenset[str]], ...],
        actions: dict[str, str],
        version: int,
    ) -> _View:
        personal = actions.get(PERSONAL, "mask") if self.personal_data else "off"
        spam = actions.get(SPAM, "flag")
        view = _View(
            tuple((m.automaton, m.entries, ignored) for m, ignored in matchers if m.automaton),
            actions,
            version,
            personal,
            spam,
        )
        if _native is not None and self.native:
            pairs = []
            for m, ignored in matchers:
                if m.compiled is None:
                    continue
                enabled = bytes(
                    not (e.category in ignored or actions.get(e.category) == "off")
                    for es in m.entries
                    for e in es
                )
                codes = bytes(
                    ACTION_ORDER.index(a) if (a := _action(view, c)) in ACTION_ORDER else 0
                    for c in m.compiled.categories
                )
                pairs.append((m.compiled, enabled, codes))
            limits = self.spam
            scanner = _native.Scanner(
                tuple(pairs),
                ACTION_ORDER,
                code_table(),
                char_flags(),
                Verdict,
                version,
                personal != "off",
                spam != "off",
                (limits.repeats, limits.repeat_window_ms, limits.links, limits.link_window_ms),
                functools.partial(_found, view),
            )
            view = dataclasses.replace(view, scanner=scanner)
        return view

    # -- reading

    def version(self, tenant_id: str = "") -> int:
        snap = self._snapshot
        return snap.tenants.get(tenant_id, snap.shared).version

    def lists(self) -> dict[str, dict[str, CategoryList]]:
        """The lists in force: ``*`` (shared) and each tenant's own."""
        out: dict[str, dict[str, CategoryList]] = {ALL_TENANTS: self._shared_lists()}
        for (tenant, category), lst in sorted(self._lists.items()):
            if tenant != ALL_TENANTS:
                out.setdefault(tenant, {})[category] = lst
        return out

    # -- the check

    def check_reference(
        self,
        text: str,
        tenant_id: str = "",
        *,
        recent: Sequence[SenderEntry] | None = None,
        now: int = 0,
    ) -> Verdict:
        """``check`` in Python only: the reference the native path is tested against,
        and the fallback when the extension is not built."""
        snap = self._snapshot
        return self._check_python(snap.tenants.get(tenant_id) or snap.shared, text, recent, now)

    def _check_python(
        self, view: _View, text: str, recent: Sequence[SenderEntry] | None, now: int
    ) -> Verdict:
        # One translate, one automaton pass per list set, a byte count for personal
        # data, the verdict.
        norm = text.translate(self._table)
        hits = []
        for automaton, entries, ignored in view.matchers:
            found = automaton.find_matches_as_indexes(norm, overlapping=True)
            if found:
                hits.append((entries, ignored, found))
        personal: list[tuple[int, int, str]] = []
        if view.personal != "off":
            raw = text.encode()
            if (
                len(raw) - len(raw.translate(None, _ASCII_DIGITS)) >= 7
                or "@" in text
                or (not text.isascii() and _WIDE_HINT.search(text))
            ):
                personal = find_personal(text)
        spam = recent is not None and view.spam != "off" and _is_spam(norm, recent, now, self.spam)
        if not hits and not personal and not spam:
            return Verdict("pass", text, (), view.version)
        return _decide(view, text, hits, personal, spam)


def _decide(
    view: _View,
    text: str,
    hits: list[tuple[tuple[tuple[_Entry, ...], ...], frozenset[str], list[tuple[int, int, int]]]],
    personal: list[tuple[int, int, str]],
    spam: bool,
) -> Verdict:
    spans: dict[str, list[tuple[int, int]]] = {}
    if hits:
        where = offsets(text)  # normalised position -> original position
        for entries, ignored, found in hits:
            for index, start, end in found:
                first, last = where[start], where[end - 1] + 1
                for entry in entries[index]:
                    if entry.category in ignored or view.actions.get(entry.category) == "off":
                        continue
                    if _accepts(entry, text, first, last, separated=last - first != end - start):
                        spans.setdefault(entry.category, []).append((first, last))
    if personal:
        spans.setdefault(PERSONAL, []).extend((s, e) for s, e, _ in personal)
    if spam:
        spans.setdefault(SPAM, [])
    return _verdict(view, text, spans)


def _found(
    view: _View,
    text: str,
    accepted: list[tuple[str, int, int]] | None,
    personal_hint: bool,
    spam: bool,
) -> Verdict:
    """The verdict from what the native pass found: word hits already past the
    boundary rules, and whether personal data may be there (the regexes decide)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    if accepted:
        for category, first, last in accepted:
            spans.setdefault(category, []).append((first, last))
    if personal_hint:
        personal = find_personal(text)
        if personal:
            spans.setdefault(PERSONAL, []).extend((s, e) for s, e, _ in personal)
    if spam:
        spans.setdefault(SPAM, [])
    return _verdict(view, text, spans)


def _verdict(view: _View, text: str, spans: dict[str, list[tuple[int, int]]]) -> Verdict:
    if not spans:  # every hit was inside a longer word, or a plain number
        return Verdict("pass", text, (), view.version)
    categories = tuple(sorted(spans))
    actions = {c: _action(view, c) for c in categories}
    action = max(actions.values(), key=ACTION_ORDER.index)
    # A blocked text is recorded masked: the words that blocked it are not repeated.
    masking = [c for c in categories if action == "block" or actions[c] == "mask"]
    chars = list(text)
    for category in masking:
        for start, end in spans[category]:
            chars[start:end] = "*" * (end - start)
    return Verdict(action, "".join(chars), categories, view.version)


def _action(view: _View, category: str) -> str:
    if category == PERSONAL:
        return view.personal
    return view.actions.get(category, "flag")


def _accepts(entry: _Entry, text: str, first: int, last: int, *, separated: bool) -> bool:
    if entry.left_boundary and first > 0:
        before = text[first - 1]
        if is_word_char(before):
            return False  # "ass" in "class"
        if before == "'" and first > 1 and is_word_char(text[first - 2]):
            return False  # "shit" in "it's hit"
    if entry.right_boundary and last < len(text) and is_word_char(text[last]):
        return False
    # "4 55" reads as "ass", but digits and spaces with no letter are just a number.
    return not (separated and entry.has_letters and not any(c.isalpha() for c in text[first:last]))


# ------------------------------------------------------------------ personal data

# Worth the full search only with 7 ASCII digits, an @, or full-width digits / @.
_ASCII_DIGITS = b"0123456789"
_WIDE_HINT = re.compile("[０-９＠]")
_MOBILE_CN = re.compile(r"(?<!\d)(?:\+?86[\s-]?)?1[3-9]\d(?:[\s-]?\d{4}){2}(?!\d)")
_PHONE_INTL = re.compile(r"\+\d{1,3}[\s-]?\d{1,4}(?:[\s-]?\d{2,4}){2,4}(?!\d)")
_LANDLINE_CN = re.compile(r"(?<!\d)0\d{2,3}-\d{7,8}(?!\d)")
_ID_CARD_CN = re.compile(
    r"(?<!\d)[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![\dXx])"
)
_CARD = re.compile(r"(?<!\d)\d(?:[\s-]?\d){12,18}(?!\d)")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def _digits(s: str) -> str:
    return "".join(str(int(c)) for c in s if c.isdigit())  # full-width digits too


def id_card_valid(number: str) -> bool:
    """GB 11643 check digit (ISO 7064 MOD 11-2) of an 18-character Chinese ID number."""
    body = _digits(number[:17])
    if len(body) != 17:
        return False
    total = sum(int(d) * w for d, w in zip(body, _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == number[17].upper()


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def find_personal(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, kind)`` of the personal data in ``text``, on its own positions."""
    found: list[tuple[int, int, str]] = []
    for m in _ID_CARD_CN.finditer(text):
        if id_card_valid(m.group()):
            found.append((m.start(), m.end(), "id_card"))
    for m in _CARD.finditer(text):
        digits = _digits(m.group())
        if luhn_valid(digits) and not _inside(found, m.start(), m.end()):
            found.append((m.start(), m.end(), "bank_card"))
    for pattern, kind in ((_MOBILE_CN, "phone"), (_PHONE_INTL, "phone"), (_LANDLINE_CN, "phone")):
        for m in pattern.finditer(text):
            if not _inside(found, m.start(), m.end()):
                found.append((m.start(), m.end(), kind))
    found.extend((m.start(), m.end(), "email") for m in _EMAIL.finditer(text))
    return sorted(found)


def _inside(found: list[tuple[int, int, str]], start: int, end: int) -> bool:
    return any(s <= start and end <= e for s, e, _ in found)


# --------------------------------------------------------------------------- spam


def _fingerprint(norm: str) -> int:
    return zlib.crc32(norm.encode("utf-8"))


def _links(norm: str) -> int:
    # On normalised text: "h t t p s : / /" and "ＷＷＷ." count too.
    return norm.count("http") + norm.count("www")


def sender_entry(text: str, at: int) -> SenderEntry:
    """What a conversation keeps of an inbound message for the spam signals."""
    if _native is not None:
        fingerprint, links = _native.sender_stats(text, code_table())
        return (at, fingerprint, links)
    return sender_entry_reference(text, at)


def sender_entry_reference(text: str, at: int) -> SenderEntry:
    norm = normalize(text)
    return (at, _fingerprint(norm), _links(norm))


def remember(recent: Sequence[SenderEntry], entry: SenderEntry) -> tuple[SenderEntry, ...]:
    return (*recent[-(RECENT_SIZE - 1) :], entry)


def _is_spam(norm: str, recent: Sequence[SenderEntry], now: int, limits: SpamLimits) -> bool:
    links = _links(norm)
    if links >= limits.links:
        return True
    if not recent:
        return False
    fingerprint = _fingerprint(norm)
    repeats = 1
    for at, fp, n in recent:
        if fp == fingerprint and now - at <= limits.repeat_window_ms:
            repeats += 1
        if links and now - at <= limits.link_window_ms:
            links += n
    return repeats >= limits.repeats or links >= limits.links
