"""Text normalisation for matching, with a map back to the original text. Pure.

Every character maps to at most one character, or to nothing, so the normalised text
is one ``str.translate`` (C speed) and position ``i`` of it comes from exactly one
position of the original. The map is only computed when a word matched, to mask the
original characters.

What folds, in order, per character:
  NFKC compatibility (full-width ``Ａ１！`` → ``A1!``, circled and mathematical letters),
  lower case, Latin diacritics stripped (``ü`` → ``u``), Cyrillic and Greek look-alikes
  (``о`` → ``o``), traditional → simplified Chinese (OpenCC's character table),
  digit/symbol substitutions (``0→o 1→i 3→e 4→a 5→s 7→t 8→b 9→g @→a $→s !→i``, and
  ``l→i`` so that ``1`` can stand for either), then separators and symbols (spaces,
  punctuation, emoji, zero-width and combining marks) are dropped, so ``f.u.c.k`` and
  ``傻 逼`` read as the words they hide. Apostrophes are kept: ``it's hit`` is not
  ``shit``.
"""

from __future__ import annotations

import array
import functools
import itertools
import unicodedata

# Characters above this pass through unchanged (``str.translate`` treats an
# IndexError as "no mapping"): the table covers the BMP and the symbol and
# mathematical-letter planes where evasions live.
TABLE_SIZE = 0x20000

# Unicode categories dropped as separators: spaces, controls, format characters
# (zero-width joiners), punctuation, symbols (emoji), combining marks.
SEPARATOR_CATEGORIES = frozenset(
    {"Zs", "Zl", "Zp", "Cc", "Cf", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po"}
    | {"Sm", "Sc", "Sk", "So", "Mn", "Me"}
)
KEPT = frozenset("'")  # "it's hit" must not become "itshit"
APOSTROPHES = {"’": "'", "‘": "'", "`": "'", "´": "'"}

SUBSTITUTIONS = {
    "0": "o",
    "1": "i",
    "3": "e",
    "4": "a",
    "5": "s",
    "7": "t",
    "8": "b",
    "9": "g",
    "@": "a",
    "$": "s",
    "!": "i",
    "€": "e",
    "¡": "i",
    # 1 stands for i and for l: fold both letters into one class, the list words too.
    "l": "i",
}

# Letters that look Latin in other scripts (lower case; upper case is folded first).
LOOKALIKES = {
    "а": "a",
    "в": "b",
    "е": "e",
    "к": "k",
    "м": "m",
    "н": "h",
    "о": "o",
    "р": "p",
    "с": "c",
    "т": "t",
    "у": "y",
    "х": "x",
    "ѕ": "s",
    "і": "i",
    "ј": "j",
    "ԁ": "d",
    "α": "a",
    "β": "b",
    "ε": "e",
    "ι": "i",
    "κ": "k",
    "ν": "v",
    "ο": "o",
    "ρ": "p",
    "τ": "t",
    "υ": "u",
    "χ": "x",
}

# CJK ranges handed to OpenCC for its traditional → simplified character table.
CJK_RANGES = ((0x3400, 0x4DC0), (0x4E00, 0xA000), (0xF900, 0xFB00))


@functools.cache
def traditional_to_simplified() -> dict[str, str]:
    """OpenCC's character-level t2s table (no phrases: one character in, one out)."""
    import opencc

    chars = "".join(chr(c) for lo, hi in CJK_RANGES for c in range(lo, hi))
    # One character per line, so OpenCC's phrase matching never spans two of them.
    converted = opencc.OpenCC("t2s.json").convert("\n".join(chars)).split("\n")
    if len(converted) != len(chars):  # a library change we do not understand: no t2s
        return {}
    return {t: s for t, s in zip(chars, converted, strict=True) if len(s) == 1 and s != t}


def _fold(ch: str, t2s: dict[str, str]) -> str | None:
    """The normalised form of one character: one character, or None to drop it."""
    k = unicodedata.normalize("NFKC", ch)
    if len(k) != 1:
        # "…" is "...", "⑩" is "10": drop pure punctuation, keep anything else as is.
        if k and all(unicodedata.category(c) in SEPARATOR_CATEGORIES for c in k):
            return None
        k = ch
    low = k.lower()
    if len(low) == 1:
        k = low
    if not k.isascii() and k.isalpha():
        base = unicodedata.normalize("NFKD", k)[0]
        if base.isascii() and base.isalpha():
            k = base.lower()
    k = APOSTROPHES.get(k, k)
    k = LOOKALIKES.get(k, k)
    k = t2s.get(k, k)
    k = SUBSTITUTIONS.get(k, k)
    if k not in KEPT and unicodedata.category(k) in SEPARATOR_CATEGORIES:
        return None
    return k


@functools.cache
def table() -> list[int | None]:
    """The translation table: code point → code point, or None to drop it.

    A list rather than a dict: ``str.translate`` looks every character up, and a list
    hit is about twice as fast as a dict lookup (and a dict miss raises internally).
    Built once per process (~0.2 s)."""
    t2s = traditional_to_simplified()
    out: list[int | None] = list(range(TABLE_SIZE))
    for code in range(TABLE_SIZE):
        if 0xD800 <= code < 0xE000:
            continue  # surrogates never appear in a str
        ch = chr(code)
        folded = _fold(ch, t2s)
        if folded is None:
            out[code] = None
        elif folded != ch:
            out[code] = ord(folded)
    return out


def normalize(text: str) -> str:
    """The text as matching sees it."""
    return text.translate(table())


def normalize_with_offsets(text: str) -> tuple[str, list[int]]:
    """The normalised text and, for each of its characters, the index in ``text`` it
    came from. ``normalize_with_offsets(t)[0] == normalize(t)`` always."""
    tab = table()
    size = len(tab)
    chars: list[str] = []
    offsets: list[int] = []
    for index, ch in enumerate(text):
        code = ord(ch)
        mapped = tab[code] if code < size else code
        if mapped is None:
            continue
        chars.append(chr(mapped))
        offsets.append(index)
    return "".join(chars), offsets


@functools.cache
def _keep_table() -> list[int]:
    return [0 if mapped is None else 1 for mapped in table()]


def offsets(text: str) -> list[int]:
    """``normalize_with_offsets(text)[1]``, at C speed: one translate marks each
    character kept (1) or dropped (0), ``compress`` picks the kept positions."""
    flags = text.translate(_keep_table())
    if not flags.isascii():  # characters beyond the table: the plain loop
        return normalize_with_offsets(text)[1]
    return list(itertools.compress(range(len(text)), flags.encode("ascii")))


# The native matcher's tables (streams/_native/moderation.c): the same fold, as bytes.
DROP = 0xFFFFFFFF  # "dropped" in the code-point table
F_WORD = 1  # is_word_char
F_DIGIT = 2  # str.isdigit
F_ASCII_DIGIT = 4
F_HINT = 8  # "@", a full-width digit or "＠": personal data worth a look


@functools.cache
def code_table() -> bytes:
    """``table()`` as native unsigned 32-bit code points, ``DROP`` for None."""
    return array.array("I", [DROP if m is None else m for m in table()]).tobytes()


@functools.cache
def char_flags() -> bytes:
    """Per code point below ``TABLE_SIZE``: ``F_WORD`` | ``F_DIGIT`` | ... No character
    above it is a word character (NFKC maps none of them to ASCII), checked once."""
    out = bytearray(TABLE_SIZE)
    for ch in "0123456789":
        out[ord(ch)] |= F_ASCII_DIGIT
    for ch in "@０１２３４５６７８９＠":
        out[ord(ch)] |= F_HINT
    for code in range(TABLE_SIZE):
        ch = chr(code)
        if ch.isdigit():
            out[code] |= F_DIGIT
        # NFKC of a character that is not alphanumeric never is: skip the normalize.
        if (ch.isalnum() or not ch.isascii()) and is_word_char(ch):
            out[code] |= F_WORD
    return bytes(out)


def is_word_char(ch: str) -> bool:
    """A Latin letter or digit in any width: what ends an English word."""
    k = unicodedata.normalize("NFKC", ch)
    return len(k) == 1 and k.isascii() and k.isalnum()
