"""The exemplar bank: labelled texts, embedded, in the vector index, for the retrieval stage.

Two sources fill it:

- labelled JSONL (format: shared/data/README.md) via `cascade bank import FILE --kind
  exemplars`; by default only rows of the train split (`cascade.data.split_of`), so rows
  that calibrate thresholds or report figures never sit in the bank (`--split all` to
  bank everything, e.g. production decisions that are never evaluated on);
- policy seed exemplars, `cascade/policies/seeds/<category>.yaml`: hand-written, versioned
  violating and benign (hard negative) examples per policy category, via `cascade bank seed`.

Every exemplar is upserted by id (idempotent): importing the same file twice changes nothing.

Each exemplar records the identity of the encoder that embedded it (`encoder`). Vectors of
different encoders are not comparable, so the retrieval stage refuses a bank that holds any
other (`bank_problem`); `reindex` (`cascade bank reindex`) re-embeds every exemplar in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import yaml

from cascade.data import LabelledItem
from cascade.embedding import Embedder
from cascade.normalize import normalize, text_key
from cascade.vectorindex import VectorIndex

POLICY_SEED_SOURCE = "policy-seed"
SEEDS_DIRNAME = "seeds"
IMPORT_BATCH = 256


def exemplar_payload(row: LabelledItem, added_by: str, added_at: datetime, **extra: Any) -> dict[str, Any]:
    """What the index stores beside the vector; the LLM stage reads `text` as a few-shot example."""
    return {
        "text": row.text,
        "flagged": int(row.flagged),
        "labels": dict(row.labels),
        "label_keys": sorted(row.labels),
        "violates": sorted(c for c, v in row.labels.items() if v),
        "source": row.source,
        "added_at": added_at.isoformat(),
        "added_by": added_by,
        **extra,
    }


def _batches(rows: Iterable[LabelledItem], size: int) -> Iterator[list[LabelledItem]]:
    it = iter(rows)
    while batch := list(islice(it, size)):
        yield batch


def add_exemplars(
    index: VectorIndex,
    embedder: Embedder,
    rows: Iterable[LabelledItem],
    added_by: str,
    on_batch: Callable[[int], None] | None = None,
    **extra: Any,
) -> int:
    """Embed and upsert rows in batches; returns how many.

    Call `index.optimize()` after the last bulk load so the ANN index covers the new points.
    """
    added_at = datetime.now(UTC)
    total = 0
    for batch in _batches(rows, IMPORT_BATCH):
        vectors = embedder.embed([row.text for row in batch])
        payloads = [exemplar_payload(row, added_by, added_at, **extra, encoder=embedder.identity) for row in batch]
        index.upsert([row.id for row in batch], vectors, payloads)
        total += len(batch)
        if on_batch is not None:
            on_batch(len(batch))
    return total


def bank_problem(index: VectorIndex, encoder: str) -> str | None:
    """Why the bank cannot serve queries embedded by `encoder` (empty, or embedded by another), else None."""
    total = index.count()
    if total == 0:
        return "the exemplar bank is empty (run `cascade bank seed` or `cascade bank import`)"
    others = {name: n for name, n in index.encoders().items() if name != encoder}
    unrecorded = total - sum(index.encoders().values())
    if others or unrecorded:
        found = ", ".join(f"{n} by {name}" for name, n in sorted(others.items()))
        found += f"{', ' if found else ''}{unrecorded} by an unrecorded encoder" if unrecorded else ""
        return (
            f"the exemplar bank holds vectors of another encoder ({found}), this process embeds with {encoder}: "
            "run `cascade bank reindex` to re-embed it"
        )
    return None


def reindex(index: VectorIndex, embedder: Embedder, on_batch: Callable[[int], None] | None = None) -> int:
    """Re-embed, in place (same ids and payloads), every exemplar that another encoder embedded; returns
    how many. The identity names the model version and precision, so one that matches is current."""
    total = 0
    offset = None
    while True:
        page, offset = index.scroll(IMPORT_BATCH, offset)
        stale = [n for n in page if n.payload.get("encoder") != embedder.identity]
        if stale:
            vectors = embedder.embed([str(n.payload.get("text", "")) for n in stale])
            payloads = [{**n.payload, "encoder": embedder.identity} for n in stale]
            index.upsert([n.id for n in stale], vectors, payloads)
            total += len(stale)
            if on_batch is not None:
                on_batch(len(stale))
        if offset is None:
            break
    # Even with nothing re-embedded: a store made under older index tuning gets its graphs built now.
    index.optimize()
    return total


@dataclass(frozen=True)
class SeedSet:
    category: str
    version: str
    also_violates: tuple[str, ...]
    violating: tuple[str, ...]
    benign: tuple[str, ...]

    def rows(self) -> list[LabelledItem]:
        """Violating rows carry the category (and `also_violates`) as 1; benign ones 0 for the category."""
        bad_labels = {self.category: 1, **dict.fromkeys(self.also_violates, 1)}
        return [
            LabelledItem(
                id=f"{POLICY_SEED_SOURCE}:{self.category}:{text_key(normalize(text))[:16]}",
                text=text,
                flagged=flagged,
                labels=bad_labels if flagged else {self.category: 0},
                source=POLICY_SEED_SOURCE,
            )
            for texts, flagged in ((self.violating, 1), (self.benign, 0))
            for text in texts
        ]


def load_seed_sets(policies_dir: Path) -> list[SeedSet]:
    sets = []
    for path in sorted((Path(policies_dir) / SEEDS_DIRNAME).glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        sets.append(
            SeedSet(
                category=str(raw["category"]),
                version=str(raw["version"]),
                also_violates=tuple(raw.get("also_violates") or ()),
                violating=tuple(str(t).strip() for t in raw["violating"]),
                benign=tuple(str(t).strip() for t in raw["benign"]),
            )
        )
    return sets


def seed_policy_exemplars(index: VectorIndex, embedder: Embedder, policies_dir: Path, added_by: str) -> int:
    """Replace the policy seed exemplars in the bank with the current seed files."""
    sets = load_seed_sets(policies_dir)
    index.delete({"source": POLICY_SEED_SOURCE})  # a seed removed from a file must leave the bank
    total = 0
    for seed_set in sets:
        total += add_exemplars(index, embedder, seed_set.rows(), added_by, seed_version=seed_set.version)
    index.optimize()
    return total
