"""The native one-pass check (streams/_native/moderation.c) against the Python reference
(``Moderator.check_reference``): the same verdict for any text, tenant, sender history
and list; its automaton finds what ahocorasick-rs finds; ``sender_entry`` agrees."""

from __future__ import annotations

import random

import ahocorasick_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams import _moderation_c as native
from streams.moderation import (
    CategoryList,
    ListRemoved,
    Moderator,
    SenderEntry,
    SpamLimits,
    WordList,
    sender_entry,
    sender_entry_reference,
)
from streams.normalize import normalize

LIST = WordList(
    words={
        "abuse": ("idiot", "fuck*", "shit", "ass", "傻逼", "他妈的", "*hole"),
        "politics": ("法轮功",),
        "spam": ("加微信", "buy followers"),
        "flagged": ("refund",),
    },
    actions={"abuse": "mask", "politics": "block", "spam": "flag", "flagged": "flag"},
    version=3,
)

PIECES = [
    "idiot",
    "IDIOT",
    "i.d.i.o.t",
    "1d10t",
    "ｉｄｉｏｔ",
    "idiоt",
    "ass",
    "class",
    "it's hit",
    "shit",
    "sh!t",
    "$h1t",
    "4 55",
    "傻逼",
    "傻 逼",
    "傻😀逼",
    "他媽的",
    "法輪功",
    "fucking",
    "asshole",
    "buy  followers",
    "加微信",
    "refund",
    "http://a.example",
    "ｈｔｔｐ://b",
    "www.c.d",
    "wwww",
    "Hello??",
    "13812345678",
    "138-1234-5678",
    "+1 415 555 2671",
    "a.b@example.com",
    "４１１１１１１１１１１１１１１１",
    "4111 1111 1111 1111",
    "11010519491231002X",
    "2026",
    "12",
    " ",
    ".",
    "，",
    "！",
    "'",
    "’",
    "\u200b",
    "\u0336",
    "a",
    "s",
    "l",
    "1",
    "我",
    "𝐟𝐮𝐜𝐤",
    "\U00020000",
]
TEXTS = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=24).map("".join)
RECENT = st.none() | st.lists(
    st.tuples(
        st.integers(0, 2_000_000),
        st.sampled_from([sender_entry("Hello??", 0)[1], sender_entry("idiot", 0)[1], 0, 2**32 - 1]),
        st.integers(0, 3),
    ),
    max_size=8,
)


def both() -> tuple[Moderator, Moderator]:
    """The same lists twice: native, and the Python reference only."""
    changes = [
        CategoryList("acme", "abuse", "block", ("zorblax", "idiot*"), 10),
        CategoryList("acme", "spam", "off", (), 11),
        CategoryList("beta", "personal", "off", (), 12),
        CategoryList("*", "flagged", "mask", ("refund", "chargeback"), 13),
    ]
    out = []
    for use_native in (True, False):
        m = Moderator(LIST, spam=SpamLimits(repeats=2, links=2), native=use_native)
        m.apply(changes)
        out.append(m)
    return out[0], out[1]


NATIVE, REFERENCE = both()
# The default spam limits too (a repeat is the third time: the native path skips the
# fingerprint when no two recent entries share one).
DEFAULT_NATIVE, DEFAULT_REFERENCE = Moderator(LIST), Moderator(LIST, native=False)


def test_the_extension_is_built_and_used() -> None:
    # `make setup` builds it; a missing build must fail here, not silently fall back.
    assert NATIVE.uses_native and not REFERENCE.uses_native
    assert Moderator(LIST).uses_native


@settings(max_examples=1500, deadline=None)
@given(TEXTS, st.sampled_from(["", "acme", "beta", "other"]), RECENT, st.integers(0, 2_000_000))
def test_native_and_reference_agree(
    text: str, tenant: str, recent: list[SenderEntry] | None, now: int
) -> None:
    expected = REFERENCE.check(text, tenant, recent=recent, now=now)
    got = NATIVE.check(text, tenant, recent=recent, now=now)
    assert got == expected
    assert type(got) is type(expected)
    assert NATIVE.check_reference(text, tenant, recent=recent, now=now) == expected
    assert DEFAULT_NATIVE.check(text, tenant, recent=recent, now=now) == (
        DEFAULT_REFERENCE.check(text, tenant, recent=recent, now=now)
    )


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_sender_entries_agree(text: str) -> None:
    assert sender_entry(text, 5) == sender_entry_reference(text, 5)


def test_generated_lists_and_messages_agree() -> None:
    """The benchmark's kind of data: a few thousand random words, mixed messages."""
    rng = random.Random(7)
    pool = [chr(c) for c in range(0x4E00, 0x4E00 + 300)] + list("abcdefghijkmnop")
    words = sorted({"".join(rng.choices(pool, k=rng.randint(2, 5))) for _ in range(3000)})
    lists = WordList(
        words={"abuse": tuple(words[:1000]), "politics": tuple(words[1000:2000])},
        actions={"abuse": "mask", "politics": "block", "spam": "flag"},
    )
    native, reference = Moderator(lists), Moderator(lists, native=False)
    filler = ["，", " ", "12", "ok", "http", "www", "@", "１３８"]
    for _ in range(3000):
        parts = [rng.choice(words) if rng.random() < 0.2 else "" for _ in range(2)]
        parts += ["".join(rng.choices(pool + filler, k=rng.randint(0, 70)))]
        rng.shuffle(parts)
        text = "".join(parts)
        recent = [(rng.randint(0, 10), rng.randint(0, 3), rng.randint(0, 2)) for _ in range(3)]
        assert native.check(text) == reference.check(text), text
        assert native.check(text, recent=recent, now=5) == reference.check(
            text, recent=recent, now=5
        )


def test_a_long_text_beyond_the_stack_buffers() -> None:
    text = ("you idiot, 傻 逼 http://x " * 200) + "13812345678"
    assert len(text) > 512
    assert NATIVE.check(text) == REFERENCE.check(text)
    recent = [(0, sender_entry(text, 0)[1], 1)]
    assert NATIVE.check(text, recent=recent, now=1) == REFERENCE.check(text, recent=recent, now=1)


def test_list_changes_reach_the_native_dispatch() -> None:
    m = Moderator(LIST)
    assert m.check("you zorblax", "acme").action == "pass"
    m.apply([CategoryList("acme", "abuse", "block", ("zorblax",), 10)])
    assert m.check("you zorblax", "acme").action == "block"
    assert m.check("you zorblax", "other").action == "pass"
    m.apply([ListRemoved("acme", "abuse")])
    assert m.check("you zorblax", "acme").action == "pass"
    assert m.check("you idiot", "acme").text == "you *****"


def test_keyword_and_positional_forms() -> None:
    m = Moderator(LIST)
    assert m.check(text="you idiot", tenant_id="acme").text == "you *****"
    assert m.check("x", recent=None, now=0).action == "pass"
    with pytest.raises(TypeError):
        m.check("x", colour="red")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        m.check(3)  # type: ignore[arg-type]


def test_an_empty_list_and_personal_data_only() -> None:
    lists = WordList(words={}, actions={})
    native, reference = Moderator(lists), Moderator(lists, native=False)
    for text in ["", "hello", "call 13812345678", "a@b.cn", "１３８１２３４５６７８"]:
        assert native.check(text) == reference.check(text)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(alphabet="abcl1傻逼我 ", min_size=1, max_size=5), min_size=1, max_size=30),
    st.text(alphabet="abcl1傻逼我 .", max_size=60),
)
def test_the_automaton_finds_what_ahocorasick_rs_finds(words: list[str], text: str) -> None:
    patterns = sorted({p for p in map(normalize, words) if p})
    if not patterns:
        return
    automaton = native.Automaton(patterns, [[] for _ in patterns], ())
    reference = ahocorasick_rs.AhoCorasick(patterns)
    norm = normalize(text)
    assert sorted(automaton.find(norm)) == sorted(
        reference.find_matches_as_indexes(norm, overlapping=True)
    )


def test_repeats_with_the_default_limits() -> None:
    hello = sender_entry("Hello??", 1000)
    other = sender_entry("other", 1000)
    for recent in ([hello], [hello, hello], [hello, other], [other, other], [hello, other, hello]):
        for text in ("Hello??", "h e l l o ? ?", "other", "new"):
            for now in (1000, 1000 + 600_001):
                expected = DEFAULT_REFERENCE.check(text, recent=recent, now=now)
                assert DEFAULT_NATIVE.check(text, recent=recent, now=now) == expected
    assert DEFAULT_NATIVE.check("Hello??", recent=[hello, hello], now=1001).action == "flag"
    assert DEFAULT_NATIVE.check("Hello??", recent=[hello, other], now=1001).action == "pass"
