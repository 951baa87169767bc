"""Moderation, pure: evasions are caught and masked on the original characters, words
match as words, per-tenant lists apply live, personal data and spam signals, and the
property that masking never changes the length or any character it did not match."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import CODEC
from schemas.records import MessageModerated, ReceiveMessage, WordListChanged
from streams.lifecycle import Conversation, Policy, decide, evolve
from streams.moderation import (
    CategoryList,
    ListRemoved,
    Moderator,
    SpamLimits,
    WordList,
    find_personal,
    id_card_valid,
    luhn_valid,
    remember,
    sender_entry,
)
from streams.normalize import normalize
from streams.routing import TenantRouting, router
from streams.wordlists import ControlLog, change_of, list_key, next_version

LIST = WordList(
    words={
        "abuse": ("idiot", "fuck*", "shit", "ass", "傻逼", "他妈的"),
        "politics": ("法轮功",),
        "spam": ("加微信", "buy followers"),
    },
    actions={"abuse": "mask", "politics": "block", "spam": "flag"},
    version=3,
)
MOD = Moderator(LIST)


def masked(text: str, tenant: str = "") -> str:
    return MOD.check(text, tenant).text


# -------------------------------------------------------------- evasions, positions


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("you idiot!", "you *****!"),
        ("you IDIOT", "you *****"),
        ("you ｉｄｉｏｔ", "you *****"),  # full-width
        ("you i.d.i.o.t now", "you ********* now"),  # separators: the whole span
        ("you i d i o t", "you *********"),
        ("you 1d10t", "you *****"),  # digit substitutions
        ("you idiоt", "you *****"),  # Cyrillic о
        ("sh!t happens", "**** happens"),
        ("$h1t", "****"),
        ("f*ck", "f*ck"),  # a hidden letter is not a substitution: no match
        ("what the ＦＵＣＫ!!!", "what the ****!!!"),
        ("fucking hell", "****ing hell"),  # fuck* runs on; the match is masked
        ("你是傻逼吗", "你是**吗"),
        ("你是傻 逼吗", "你是***吗"),  # the space between is masked with the word
        ("你是傻😀逼吗", "你是***吗"),
        ("你是傻\u200b逼吗", "你是***吗"),
        ("他媽的", "***"),  # traditional
        ("好 他 媽 的!", "好 *****!"),
    ],
)
def test_evasions_are_masked_on_the_original_characters(text: str, expected: str) -> None:
    verdict = MOD.check(text)
    assert verdict.text == expected
    assert len(verdict.text) == len(text)
    assert verdict.action == ("mask" if expected != text else "pass")


@pytest.mark.parametrize(
    "text",
    [
        "my class assignment",  # "ass" inside words
        "assistant and password",
        "Let's hit the road",  # "shit" across an apostrophe
        "it's hit",
        "room 4 55",  # separated digits with no letter: a number, not "ass"
        "where is my order?",
        "我想退款",
    ],
)
def test_words_match_as_words_not_inside_others(text: str) -> None:
    verdict = MOD.check(text)
    assert verdict == MOD.check(text)  # deterministic
    assert verdict.action == "pass" and verdict.text == text


def test_a_word_at_the_edges_of_the_text_and_next_to_chinese() -> None:
    assert masked("ass") == "***"
    assert masked("你这ass!") == "你这***!"
    assert masked("idiot,idiot") == "*****,*****"


# ------------------------------------------------------------------ actions, version


def test_the_strongest_action_wins_and_flag_leaves_the_text() -> None:
    flagged = MOD.check("加微信 please")
    assert (flagged.action, flagged.text, flagged.categories) == (
        "flag",
        "加微信 please",
        ("spam",),
    )
    both = MOD.check("加微信 you idiot")
    assert both.action == "mask" and both.text == "加微信 you *****"
    assert both.categories == ("abuse", "spam")


def test_a_blocked_text_is_recorded_with_every_hit_masked() -> None:
    verdict = MOD.check("法輪功 idiot 加微信")
    assert verdict.action == "block"
    assert verdict.text == "*** ***** ***"
    assert verdict.categories == ("abuse", "politics", "spam")
    assert verdict.list_version == 3


# --------------------------------------------------------------- per tenant, live


def fresh() -> Moderator:
    return Moderator(LIST)


def test_a_tenant_list_replaces_that_category_for_that_tenant_only() -> None:
    m = fresh()
    m.apply([CategoryList("acme", "abuse", "block", ("zorblax",), 10)])
    assert m.check("you zorblax", "acme").action == "block"
    assert m.check("you idiot", "acme").action == "pass"  # acme's abuse list replaced it
    assert m.check("法轮功", "acme").action == "block"  # other shared categories stay
    assert m.check("you zorblax", "other").action == "pass"
    assert m.check("you idiot", "other").action == "mask"
    assert (m.version("acme"), m.version("other")) == (10, 3)
    assert m.check("x", "acme").list_version == 10


def test_removing_a_tenant_list_restores_the_shared_one() -> None:
    m = fresh()
    m.apply([CategoryList("acme", "abuse", "block", ("zorblax",), 10)])
    m.apply([ListRemoved("acme", "abuse")])
    assert m.check("you zorblax", "acme").action == "pass"
    assert m.check("you idiot", "acme").action == "mask"
    assert m.version("acme") == 3


def test_a_shared_change_reaches_every_tenant_without_its_own() -> None:
    m = fresh()
    m.apply([CategoryList("acme", "spam", "flag", ("casino",), 11)])
    m.apply([CategoryList("*", "abuse", "mask", ("idiot", "moron"), 12)])
    assert m.check("moron", "anyone").text == "*****"
    assert m.check("moron", "acme").text == "*****"  # acme has its own spam, not abuse
    assert m.version("anyone") == 12 and m.version("acme") == 12


def test_an_older_version_published_late_does_not_win() -> None:
    m = fresh()
    m.apply([CategoryList("acme", "abuse", "mask", ("new",), 20)])
    m.apply([CategoryList("acme", "abuse", "mask", ("old",), 19)])
    assert m.check("old new", "acme").text == "old ***"


def test_off_disables_a_category() -> None:
    m = fresh()
    m.apply([CategoryList("acme", "politics", "off", ("法轮功",), 5)])
    assert m.check("法轮功", "acme").action == "pass"
    m.apply([CategoryList("acme", "personal", "off", (), 6)])
    assert m.check("call 13812345678", "acme").action == "pass"


def test_bad_list_changes_are_refused() -> None:
    m = fresh()
    with pytest.raises(ValueError, match="action"):
        m.apply([CategoryList("acme", "abuse", "delete", ("x",), 5)])
    with pytest.raises(ValueError, match="category"):
        m.apply([CategoryList("acme", "Bad Category", "mask", ("x",), 5)])


def test_control_records_decode_to_list_changes() -> None:
    record = WordListChanged(
        tenant_id="acme",
        category="abuse",
        action="mask",
        words=["zorblax"],
        version=7,
        changed_at=1,
    )
    change = change_of(list_key("acme", "abuse"), CODEC.encode(record))
    assert change == CategoryList("acme", "abuse", "mask", ("zorblax",), 7)
    assert change_of(b"acme/abuse", None) == ListRemoved("acme", "abuse")
    with pytest.raises(ValueError, match="does not name"):
        change_of(b"other/abuse", CODEC.encode(record))
    log = ControlLog({list_key("acme", "abuse"): record, b"x/spam": None})
    assert log.max_version == 7
    assert next_version(log) > 7
    assert log.changes() == [change, ListRemoved("x", "spam")]


def test_the_shipped_defaults_load_and_bite() -> None:
    m = Moderator()
    assert m.check("you idiot, where is my order").text == "you *****, where is my order"
    assert m.check("Where is my order?").action == "pass"
    assert m.check("这台独立显卡多少钱").action == "pass"  # no substring trap shipped
    assert m.check("法輪功").action == "block"
    assert m.version() == 0


# ------------------------------------------------------------------ personal data


@pytest.mark.parametrize(
    ("text", "expected", "kind"),
    [
        ("我的手机13812345678", "我的手机***********", "phone"),
        ("call 138-1234-5678 ok", "call ************* ok", "phone"),
        ("call +86 138 1234 5678", "call *****************", "phone"),
        ("call +1 415 555 2671", "call ***************", "phone"),
        ("座机 010-12345678", "座机 ************", "phone"),
        ("身份证11010519491231002X号", "身份证******************号", "id_card"),
        ("mail me: a.b+c@example.co.uk!", "mail me: *******************!", "email"),
        ("card 4111 1111 1111 1111.", "card *******************.", "bank_card"),
        ("卡号6222021234567890128", "卡号*******************", "bank_card"),
    ],
)
def test_personal_data_is_masked(text: str, expected: str, kind: str) -> None:
    verdict = MOD.check(text)
    assert verdict.action == "mask" and verdict.categories == ("personal",)
    assert verdict.text == expected
    assert kind in {k for _, _, k in find_personal(text)}


@pytest.mark.parametrize(
    "text",
    [
        "order 20231121000123 shipped",  # not Luhn-valid, not a phone
        "身份证110105194912310021",  # wrong check digit
        "card 4111 1111 1111 1112",  # Luhn fails
        "12345678901",  # 11 digits not starting 1[3-9]
    ],
)
def test_numbers_that_are_not_personal_data_pass(text: str) -> None:
    assert MOD.check(text).action == "pass"


def test_check_digits() -> None:
    assert id_card_valid("11010519491231002X")
    assert not id_card_valid("110105194912310021")
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


# --------------------------------------------------------------------------- spam


def test_the_same_message_repeated_is_spam_on_the_third_time() -> None:
    recent: tuple[tuple[int, int, int], ...] = ()
    verdicts = []
    for i in range(3):
        verdicts.append(MOD.check("Hello??", recent=recent, now=1000 + i))
        recent = remember(recent, sender_entry("Hello??", 1000 + i))
    assert [v.action for v in verdicts] == ["pass", "pass", "flag"]
    assert verdicts[2].categories == ("spam",) and verdicts[2].text == "Hello??"
    # Evading with case and spacing is the same message.
    assert MOD.check("h e l l o", recent=recent, now=2000).action == "flag"
    # Out of the window: not a repeat.
    assert MOD.check("Hello??", recent=recent, now=1002 + 600_001).action == "pass"


def test_links_flooding_in_are_spam() -> None:
    three = "see http://a.example https://b.example www.c.example"
    assert MOD.check(three, recent=()).action == "flag"
    recent = (sender_entry("http://a.example", 1000), sender_entry("www.b.example", 1001))
    assert MOD.check("ｈｔｔｐ://c.example", recent=recent, now=1002).action == "flag"
    assert MOD.check("http://c.example", recent=recent, now=1000 + 60_001).action == "pass"


def test_replies_get_no_spam_signals_and_limits_are_settings() -> None:
    three = "see http://a.example https://b.example www.c.example"
    assert MOD.check(three).action == "pass"  # no sender: an outbound reply
    strict = Moderator(LIST, spam=SpamLimits(links=1))
    assert strict.check("http://a.example", recent=()).action == "flag"
    blocking = Moderator(WordList({"spam": ()}, {"spam": "block"}))
    assert blocking.check(three, recent=()).action == "block"


def test_the_conversation_remembers_its_sender_for_the_spam_signals() -> None:
    policy = Policy(Moderator(LIST), router(lambda tenant: TenantRouting(ai_enabled=True)))
    state = Conversation()
    moderated: list[MessageModerated] = []
    for n in range(3):
        command = ReceiveMessage(
            command_id=f"m-{n}",
            conversation_id="conv-1",
            tenant_id="t1",
            issued_at=1000 + n,
            channel="api",
            customer_id="u1",
            text="BUY NOW http://x.example",
            channel_message_id=f"m{n}",
        )
        for event in decide(state, command, policy):
            state = evolve(state, event)
            if isinstance(event, MessageModerated):
                moderated.append(event)
        # The state survives the Faust table's JSON round trip.
        state = Conversation.from_json(json.loads(json.dumps(state.to_json())))
    assert [m.verdict for m in moderated] == ["pass", "pass", "flag"]
    assert moderated[2].categories == ["spam"]
    assert len(state.recent) == 3


# ---------------------------------------------------------------------- property

WORDS = ["idiot", "fuck*", "ass", "傻逼", "他妈的", "法轮功"]
PIECES = st.sampled_from(
    [
        "idiot",
        "IDIOT",
        "i.d.i.o.t",
        "1d10t",
        "ass",
        "class",
        "傻逼",
        "傻 逼",
        "他媽的",
        "fucking",
        " ",
        ".",
        "，",
        "！",
        "'",
        "😀",
        "\u200b",
        "a",
        "s",
        "1",
        "我",
        "13812345678",
    ]
)
MASKING = Moderator(
    WordList({"abuse": tuple(WORDS)}, {"abuse": "mask", "personal": "mask"}), personal_data=True
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(PIECES, st.text(max_size=3)), max_size=20).map("".join))
def test_masking_never_changes_the_length_or_an_unmatched_character(text: str) -> None:
    verdict = MASKING.check(text)
    assert len(verdict.text) == len(text)
    changed = [i for i, (a, b) in enumerate(zip(text, verdict.text, strict=True)) if a != b]
    assert all(verdict.text[i] == "*" for i in changed)
    # Every run of masked characters covers a list word (or personal data) of the
    # original text: nothing outside a match was touched.
    for start, end in _runs(changed):
        original = normalize(text[start:end])
        assert any(normalize(w.strip("*")) in original for w in WORDS) or find_personal(
            text[start:end]
        ), (text, verdict.text, text[start:end])
    if verdict.action == "pass":
        assert verdict.text == text


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for i in indexes:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs
