"""Normalisation: each evasion folds to the plain word, and the offset map points every
normalised character back at the original character it came from."""

from __future__ import annotations

import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.normalize import (
    DROP,
    F_ASCII_DIGIT,
    F_DIGIT,
    F_HINT,
    F_WORD,
    TABLE_SIZE,
    char_flags,
    code_table,
    is_word_char,
    normalize,
    normalize_with_offsets,
    offsets,
    table,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ＦＵＣＫ", "fuck"),  # full-width → half-width
        ("FuCk", "fuck"),  # case
        ("f.u.c.k", "fuck"),  # ASCII symbols between letters
        ("f u c k", "fuck"),
        ("f-u_c*k", "fuck"),
        ("傻 逼", "傻逼"),  # spaces between Chinese characters
        ("傻　逼", "傻逼"),  # ideographic space
        ("傻，逼", "傻逼"),  # Chinese punctuation
        ("傻★逼", "傻逼"),  # symbols
        ("傻😀逼", "傻逼"),  # emoji
        ("傻\u200b逼", "傻逼"),  # zero-width space
        ("f\u0336u\u0336c\u0336k", "fuck"),  # combining strike-through
        ("他媽的", "他妈的"),  # traditional → simplified
        ("國家", "国家"),
        ("sh1t", "shit"),  # 1 → i
        ("5h1t", "shit"),  # 5 → s
        ("$h!t", "shit"),  # $ → s, ! → i
        ("1d10t", "idiot"),  # 0 → o
        ("b4st4rd", "bastard"),  # 4 → a
        ("@ss", "ass"),  # @ → a
        ("h3ll", "heii"),  # 3 → e; l and 1 are one class (both fold to i)
        ("idiоt", "idiot"),  # Cyrillic о
        ("fück", "fuck"),  # diacritics
        ("𝐟𝐮𝐜𝐤", "fuck"),  # mathematical bold
        ("ⓕⓤⓒⓚ", "fuck"),  # circled letters
        ("it's", "it's"),  # the apostrophe stays: "it's hit" is not "shit"
        ("it’s", "it's"),
    ],
)
def test_each_evasion_folds_to_the_word(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_offsets_point_at_the_original_characters() -> None:
    text = "Ｆ.u　c！k 傻 逼"
    norm, offsets = normalize_with_offsets(text)
    assert norm == "fucik傻逼"
    assert offsets == [0, 2, 4, 5, 6, 8, 10]
    assert [text[i] for i in offsets] == ["Ｆ", "u", "c", "！", "k", "傻", "逼"]


def test_characters_beyond_the_table_pass_unchanged() -> None:
    text = "\U00020000x"  # CJK extension B
    assert normalize(text) == text
    assert normalize_with_offsets(text) == (text, [0, 1])
    assert offsets(text) == [0, 1]


def test_word_characters_are_latin_letters_and_digits_in_any_width() -> None:
    assert is_word_char("a") and is_word_char("Ｚ") and is_word_char("7")
    assert not is_word_char(" ") and not is_word_char("傻") and not is_word_char("'")


@given(st.text(max_size=80))
def test_offset_map_agrees_with_the_fast_path(text: str) -> None:
    norm, where = normalize_with_offsets(text)
    assert norm == normalize(text)
    assert offsets(text) == where  # the fast path
    assert len(where) == len(norm)
    assert where == sorted(set(where))
    assert all(0 <= i < len(text) for i in where)
    # Each normalised character is the fold of the original one it points at.
    assert all(normalize(text[i]) == c for i, c in zip(where, norm, strict=True))


def test_the_native_tables_are_the_python_fold() -> None:
    """streams/_native/moderation.c reads these instead of calling back into Python."""
    codes = array.array("I", code_table())
    assert list(codes) == [DROP if m is None else m for m in table()]
    flags = char_flags()
    assert len(flags) == TABLE_SIZE
    for code in range(TABLE_SIZE):
        ch = chr(code)
        assert bool(flags[code] & F_WORD) == is_word_char(ch), hex(code)
        assert bool(flags[code] & F_DIGIT) == ch.isdigit(), hex(code)
        assert bool(flags[code] & F_ASCII_DIGIT) == ("0" <= ch <= "9"), hex(code)
        assert bool(flags[code] & F_HINT) == (ch in "@０１２３４５６７８９＠"), hex(code)
