"""Text normalisation against evasion, shared by every stage that matches on text.

`normalize` turns the many spellings of one message into one string: the hash stage keys
its banks on it, and `text_key` of it keys the per-process caches (embeddings, LLM
responses) so that trivially different copies share one entry. It is a *matching key*,
deliberately lossy (accents, repeated letters and punctuation go): models should read the
original text, not this.

Steps, in order (docs/hash.md explains each choice):

1. NFKD compatibility decomposition (fullwidth, 𝐛𝐨𝐥𝐝, ligatures, accents split off); HTML
   entities decoded (`&#102;uck`, scraped `&amp;`, also when disguised as `＆amp;`); casefold.
2. One pass over characters: control, format (zero-width, bidi, soft hyphen), surrogate,
   private-use and unassigned characters and combining marks (accents, Zalgo, variation
   selectors) are removed; every whitespace becomes a space; Unicode confusables that
   look like a Latin letter (Cyrillic `а`, Greek `ο`, `ǀ`...) become that letter, from the
   `confusable-homoglyphs` package's copy of Unicode's confusables.txt.
3. Leetspeak inside words: 0→o 1→i 3→e 4→a 5→s 7→t when a token with letters has at
   least as many letters as digits or has digits inside it (`h3ll0`, `70n1gh7`, `3vil`;
   `150p`, `100` and `07700900123` stay, `mp3` becomes `mpe`: harmless in a key);
   `$`→s, `@`→a after a letter or digit, `!`→i and `|`→l before a letter (`$h!t`, `b@d`;
   `@name` and a final `!` are punctuation).
4. Punctuation between two non-space characters is removed (`f.u.c.k`, `f*ck` → one
   word); other punctuation becomes a space. Symbols such as emoji and currency stay.
5. Runs of one repeated character collapse to one (`fuuuck` → `fuck`, `!!!`; digits keep
   their runs: `100` stays), runs of three or more single letters separated by spaces are
   joined (`f u c k` → `fuck`), whitespace is collapsed, the result is NFC.

`normalize` is total (any `str`, including lone surrogates and NULs) and idempotent.
"""

from __future__ import annotations

import html
import itertools
import re
import unicodedata
from collections.abc import Callable

import xxhash
from confusable_homoglyphs.confusables import confusables_data

# Bump when the output of `normalize` changes: stored bank keys are recomputed on open.
NORMALIZE_VERSION = "2"

# Internal marker for punctuation between the character pass and the punctuation step.
# Input NULs cannot collide with it: the character pass deletes every control character.
_PUNCT = "\x00"

_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Mn", "Me"})
_PUNCT_SYMBOL_CATEGORIES = frozenset({"Sk", "Sm"})  # ^ ~ + = < > and friends; So (emoji) and Sc stay
_LEET_SYMBOLS = frozenset("@$!|")
_LEET_DIGIT_MAP = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t"})

# Codepoints above this (rare CJK, unassigned, private use) are decided afresh each time, so
# input spraying random codepoints cannot grow the tables past ~130k entries each.
_CACHE_BELOW = 0x20000


def _latin_lookalikes() -> dict[str, str]:
    """Each non-ASCII character that Unicode lists as confusable with an ASCII letter -> that letter."""
    table: dict[str, str] = {}
    for char, glyphs in confusables_data.items():
        if len(char) != 1 or char.isascii():
            continue
        letters = [g["c"] for g in glyphs if len(g["c"]) == 1 and g["c"].isascii() and g["c"].isalpha()]
        if letters:
            lower = [c for c in letters if c.islower()]
            table[char] = (lower or letters)[0].lower()
    # Text is casefolded before this table applies, so Cyrillic "К" arrives as "к": give the
    # lower case of an upper-case lookalike the same letter unless it has a lookalike of its own.
    for char, letter in list(table.items()):
        folded = char.casefold()
        if len(folded) == 1 and not folded.isascii():
            table.setdefault(folded, letter)
    return table


_LOOKALIKES = _latin_lookalikes()


def _matching_char(char: str) -> str | None:
    """Step 2 for one character: its replacement, or None to delete it."""
    category = unicodedata.category(char)
    if char.isspace():
        return " "
    if category in _DROPPED_CATEGORIES:
        return None
    if char in _LOOKALIKES:
        return _LOOKALIKES[char]
    if char in _LEET_SYMBOLS:
        return char  # decided in context by the leetspeak step
    if category[0] == "P" or category in _PUNCT_SYMBOL_CATEGORIES:
        return _PUNCT
    return char


def _visible_char(char: str) -> str | None:
    return None if unicodedata.category(char) in ("Cc", "Cf") and not char.isspace() else char


class _LazyTable(dict[int, str | None]):
    """A str.translate table filled on first sight of each codepoint (building all of Unicode costs ~0.3 s)."""

    def __init__(self, decide: Callable[[str], str | None]) -> None:
        super().__init__()
        self._decide = decide

    def __missing__(self, codepoint: int) -> str | None:
        char = chr(codepoint)
        mapped = self._decide(char)
        if codepoint < _CACHE_BELOW:
            self[codepoint] = mapped
        return mapped


_CHAR_MAP = _LazyTable(_matching_char)
# Format and control characters (not whitespace): removed before decoding HTML entities.
_INVISIBLE = _LazyTable(_visible_char)
_LEFTOVER_LEET = str.maketrans(dict.fromkeys("@!|", _PUNCT))  # "$" left over is a currency sign

# A space-delimited token holding a leetspeak candidate (anchored at token starts: no backtracking).
_LEET_TOKEN = re.compile(r"(?<![^ ])[^ 013457@$!|]*[013457@$!|][^ ]*")
_INNER_PUNCT = re.compile(f"(?<=[^ {_PUNCT}]){_PUNCT}+(?=[^ {_PUNCT}])")
_REPEAT = re.compile(r"(\D)(?=\1)")  # each character that the same one follows: delete it
_SPACED_LETTERS = re.compile(r"(?<![^ ])(?:[^\W\d_] ){2,}[^\W\d_](?![^ ])")


def _unleet_symbols(token: str) -> str:
    if not _LEET_SYMBOLS.intersection(token):
        return token
    chars = list(token)
    last = len(chars) - 1
    for i, ch in enumerate(chars):
        if ch == "$":
            chars[i] = "s"
        elif ch == "@" and i > 0 and chars[i - 1].isalnum():
            chars[i] = "a"  # not at the start: "@name" is a mention, its @ is punctuation
        elif ch in "!|" and i < last and chars[i + 1].isalpha():
            chars[i] = "i" if ch == "!" else "l"  # "sh!t", "|ame"; a trailing "!" is punctuation
    return "".join(chars)


def _reads_as_word(token: str) -> bool:
    """Whether the digits of a token with letters are leetspeak ("h3ll0", "70n1gh7", "3vil")
    rather than a number with letters attached ("150p", "1000mg")."""
    is_digit = [ch.isdigit() for ch in token if ch.isalnum()]
    if sum(is_digit) * 2 <= len(is_digit):  # at least as many letters as digits
        return True
    switches = sum(a != b for a, b in itertools.pairwise(is_digit))
    return switches >= 2  # digits inside the word, not one run at an end


def _unleet(match: re.Match[str]) -> str:
    token = match.group()
    if not any(map(str.isalpha, token)):
        return token
    token = _unleet_symbols(token)
    if _reads_as_word(token):
        # Once digits are letters, a "!" before one is leetspeak too ("sh!7").
        token = _unleet_symbols(token.translate(_LEET_DIGIT_MAP))
    return token


def _join_spaced(match: re.Match[str]) -> str:
    return match.group().replace(" ", "")


def normalize(text: str) -> str:
    """The matching form of `text` (see the module docstring for the steps)."""
    text = unicodedata.normalize("NFKD", text)
    if "&" in text:
        # After NFKD and without invisible characters, so "＆amp;" and "&am\u200bp;" decode too.
        text = unicodedata.normalize("NFKD", html.unescape(text.translate(_INVISIBLE)))
    text = text.casefold()
    text = text.translate(_CHAR_MAP)
    text = _LEET_TOKEN.sub(_unleet, text)
    text = text.translate(_LEFTOVER_LEET)
    text = _INNER_PUNCT.sub("", text).replace(_PUNCT, " ")
    text = _REPEAT.sub("", text)
    if _SPACED_LETTERS.search(text):
        # Joining can create new runs ("f u u c k" -> "fuuck"), hence the second pass.
        text = _REPEAT.sub("", _SPACED_LETTERS.sub(_join_spaced, text))
    return unicodedata.normalize("NFC", text.strip())


def has_content(normalized: str) -> bool:
    """True when a normalised text holds a letter or digit: emoji- or punctuation-only texts never match banks."""
    return any(ch.isalnum() for ch in normalized)


def text_key(normalized: str) -> str:
    """A 128-bit hex key of normalised text, for caches and exact banks."""
    return xxhash.xxh3_128_hexdigest(normalized.encode("utf-8", "surrogatepass"))
