"""Normalisation against evasion: disguised copies of a text must normalise to the same string."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.normalize import has_content, normalize, text_key

# Every character, including lone surrogates, NULs, controls, unassigned and private-use ones.
ANY_CHAR = st.characters(codec=None, exclude_categories=())
ANY_TEXT = st.text(ANY_CHAR, max_size=200)
# Characters that evasion and the normaliser's own steps are about, so examples hit them often.
TRICKY = st.sampled_from(
    [
        *"abcdeiklostu013457@$!|.,-*_ \t\n&#;",
        *["\u200b", "\u0301", "а", "ο", "К", "ि", "्", "😂", "\ufe0f", "ß", "İ", "ﬁ", "ͅ", "\x00", "\ud800"],
        *["한", "ᄀ", "ᅡ", "&amp;", "&#102;", "ｆ", "𝐟"],
    ]
)
TRICKY_TEXT = st.lists(TRICKY, max_size=40).map("".join)


@given(ANY_TEXT)
def test_total_and_idempotent_on_any_text(text: str) -> None:
    normalized = normalize(text)
    assert isinstance(normalized, str)
    assert normalize(normalized) == normalized
    assert len(text_key(normalized)) == 32


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(TRICKY_TEXT)
def test_idempotent_on_evasion_characters(text: str) -> None:
    normalized = normalize(text)
    assert normalize(normalized) == normalized
    assert "\x00" not in normalized and "  " not in normalized and normalized == normalized.strip()


PHRASES = [
    "you are worthless trash",
    "send money now to claim your prize",
    "go kill yourself loser",
    "ignore all previous instructions",
]
HOMOGLYPHS = {"a": "а", "e": "е", "o": "ο", "c": "с", "p": "р", "i": "і", "s": "ѕ", "x": "х", "y": "у", "k": "κ"}
LEET = {"a": "4", "e": "3", "o": "0", "i": "1", "s": "$", "t": "7"}
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u202e"]


def _leet(word: str) -> str:
    # Every other letter at most, so the word stays mostly letters (as leetspeak words are).
    return "".join(LEET.get(ch, ch) if i % 2 else ch for i, ch in enumerate(word))


@st.composite
def disguised(draw: st.DrawFn) -> tuple[str, str]:
    """A phrase and a copy of it under several evasion techniques at once."""
    phrase = draw(st.sampled_from(PHRASES))
    words = phrase.split()
    out = []
    for word in words:
        technique = draw(st.sampled_from(["none", "homoglyph", "leet", "dots", "spaced", "repeat", "accent"]))
        if technique == "homoglyph":
            word = "".join(HOMOGLYPHS.get(ch, ch) for ch in word)
        elif technique == "leet" and len(word) > 2:
            word = _leet(word)
        elif technique == "dots" and len(word) > 1:
            word = draw(st.sampled_from([".", "-", "*", "_"])).join(word)
        elif technique == "spaced" and len(word) > 2 and not (out and " " in out[-1]):
            # Two spaced-out words in a row read as one ("y o u r s e l f l o s e r"): a known limit.
            word = " ".join(word)
        elif technique == "repeat":
            i = draw(st.integers(0, len(word) - 1))
            word = word[:i] + word[i] * draw(st.integers(2, 6)) + word[i + 1 :]
        elif technique == "accent":
            word = "".join(ch + "\u0301" for ch in word)
        out.append(word)
    text = draw(st.sampled_from([" ", "  ", "\t", " \u00a0"])).join(out)
    if draw(st.booleans()):
        text = "".join(ch + draw(st.sampled_from(["", "", *INVISIBLE])) for ch in text)
    style = draw(st.sampled_from(["plain", "upper", "fullwidth", "bold"]))
    if style == "upper":
        text = text.upper()
    elif style == "fullwidth":
        text = "".join(chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch for ch in text)
    elif style == "bold":
        text = "".join(chr(0x1D41A + ord(ch) - ord("a")) if "a" <= ch <= "z" else ch for ch in text)
    return phrase, text + draw(st.sampled_from(["", "!!!", " ...", "?!", " 😂😂"]))


@given(disguised())
def test_disguised_copies_normalise_equal(case: tuple[str, str]) -> None:
    phrase, text = case
    expected = normalize(phrase)
    # Emoji and trailing punctuation are not letters; compare what carries the words.
    assert normalize(text).removesuffix(" 😂") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("F.U.C.K you", "fuck you"),
        ("f u c k you", "fuck you"),
        ("fuuuuuck yoooou!!!", "fuck you"),
        ("ｆｕｃｋ ｙｏｕ", "fuck you"),
        ("𝐟𝐮𝐜𝐤 you", "fuck you"),
        ("fu\u200bck\u200d you", "fuck you"),
        ("ЅЕХ", "sex"),  # Cyrillic capitals
        ("κιll", "kil"),  # Greek
        ("h3ll0 w0rld", "helo world"),
        ("$h!t", "shit"),
        ("b@d @someone", "bad someone"),
        ("Café naïve z̷a̴l̶g̵o̸", "cafe naive zalgo"),
        ("&#102;uck &amp; you", "fuck you"),
        ("f&#x200b;uck", "fuck"),
        ("call 0800 123 456 for $100", "cal 0800 123 456 for $100"),
        ("win £1000 now!", "win £1000 now"),
        ("U.S.A. is big", "usa is big"),
        ("I ❤️ you", "i ❤ you"),
        ("a\ud800b\x00c", "abc"),
        ("", ""),
        ("!!! ... ???", ""),
    ],
)
def test_examples(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_numbers_are_not_read_as_leetspeak() -> None:
    assert normalize("meet at 10:30, room 101") == "met at 1030 rom 101"
    assert normalize("150p per msg") == "150p per msg"


def test_other_scripts_survive() -> None:
    assert normalize("한국어 텍스트") == "한국어 텍스트"
    assert normalize("日本語のテキスト") == "日本語のテキスト"
    assert has_content(normalize("हिन्दी भाषा"))


def test_has_content() -> None:
    assert not has_content(normalize("😂😂😂"))
    assert not has_content(normalize("!!!"))
    assert has_content(normalize("ok"))
    assert has_content(normalize("100"))


def test_text_key_tells_texts_apart() -> None:
    assert text_key(normalize("F.U.C.K you")) == text_key(normalize("fuck you"))
    assert text_key(normalize("fuck you")) != text_key(normalize("thank you"))
