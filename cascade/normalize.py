"""Text normalisation against evasion, shared by every stage that matches on text.

The hash stage matches banks on `normalize(text)`; `text_key` of it keys the per-process
caches (embeddings, LLM responses) so that trivially different copies share one entry.
"""

from __future__ import annotations

import re
import unicodedata

import xxhash

_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Cc", "Cf") or ch in "\t\n")
    text = text.casefold()
    return _WHITESPACE.sub(" ", text).strip()


def text_key(normalized: str) -> str:
    """A 128-bit hex key of normalised text, for caches and exact banks."""
    return xxhash.xxh3_128_hexdigest(normalized.encode("utf-8", "surrogatepass"))
