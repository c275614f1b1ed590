"""The signal a hash bank matches on: MinHash signatures of a normalised text's shingles.

Apart from the store and the index (as python-threatexchange keeps a signal type apart from
its index): the store keeps signatures, the index compares them, this module makes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash
from datasketch import MinHash

from cascade.normalize import has_content

NUM_PERM = 128
MINHASH_SCHEME = "affine32"
# Fixed permutations: signatures stored today must stay comparable with queries tomorrow.
_PERMUTATIONS = MinHash(num_perm=NUM_PERM, seed=1, scheme=MINHASH_SCHEME).permutations
SIGNATURE_DTYPE = np.dtype("<u4")


@dataclass(frozen=True)
class Shingler:
    """The sets that MinHash compares: word n-grams plus character n-grams of the normalised text.

    Word bigrams alone miss on short texts (few shingles, one changed word halves the
    overlap); character n-grams carry typos and small edits. Measured in docs/hash.md.
    """

    word_n: int = 2
    char_n: int = 4

    @property
    def version(self) -> str:
        return f"w{self.word_n}c{self.char_n}"

    def shingles(self, normalized: str) -> set[str]:
        words = normalized.split()
        found = {" ".join(words[i : i + self.word_n]) for i in range(max(1, len(words) - self.word_n + 1))}
        if self.char_n:
            padded = f" {normalized} "
            # A "\x01" prefix keeps character grams apart from one-word word grams.
            found.update("\x01" + padded[i : i + self.char_n] for i in range(len(padded) - self.char_n + 1))
        found.discard("")
        return found

    def signature(self, normalized: str) -> np.ndarray | None:
        """The MinHash signature (NUM_PERM uint32), or None for a text with nothing to match."""
        if not has_content(normalized):
            return None
        minhash = MinHash(
            num_perm=NUM_PERM, permutations=_PERMUTATIONS, hashfunc=xxhash.xxh32_intdigest, scheme=MINHASH_SCHEME
        )
        minhash.update_batch([s.encode("utf-8", "surrogatepass") for s in self.shingles(normalized)])
        return minhash.hashvalues.astype(SIGNATURE_DTYPE, copy=False)


class StoredSignature:
    """What `MinHashLSH` reads of a MinHash, around a stored signature (a full MinHash costs ~40 µs to build)."""

    scheme = MINHASH_SCHEME

    def __init__(self, hashvalues: np.ndarray) -> None:
        self.hashvalues = hashvalues

    def __len__(self) -> int:
        return len(self.hashvalues)
