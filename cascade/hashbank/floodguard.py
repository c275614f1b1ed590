"""The flood guard: an unconfirmed bank entry that suddenly matches too much traffic is quarantined."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class FloodGuard:
    """Counts which entries the last `window` items matched, to catch an entry matching too much.

    A bank entry is a statement about one text; when it suddenly matches more than `share`
    of recent traffic it is more likely too generic (or the normaliser folds too much) than a
    real campaign of copies, and auto-deciding on it would block or clear traffic wholesale.
    """

    window: int
    share: float
    min_items: int
    _recent: deque[tuple[str, ...]] = field(default_factory=deque, init=False)
    _counts: Counter[str] = field(default_factory=Counter, init=False)

    def record(self, entry_ids: Iterable[str]) -> list[str]:
        """Record one item's matched entries; return those now over the share."""
        matched = tuple(sorted(set(entry_ids)))
        if len(self._recent) == self.window:
            for expired in self._recent.popleft():
                self._counts[expired] -= 1
                if not self._counts[expired]:
                    del self._counts[expired]  # keep the counter as small as the window
        self._recent.append(matched)
        self._counts.update(matched)
        seen = len(self._recent)
        if seen < self.min_items:
            return []
        return [entry_id for entry_id in matched if self._counts[entry_id] > self.share * seen]

    def count(self, entry_id: str) -> int:
        return self._counts[entry_id]

    def __len__(self) -> int:
        return len(self._recent)
