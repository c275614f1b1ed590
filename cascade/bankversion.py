"""A counter of bank changes, shared by every process that uses one data directory.

Every write to a bank (hash entries added, changed, removed, quarantined or confirmed;
exemplars imported or seeded) bumps it. Judgements cached against the banks
(`cascade.repeats`) carry the counter they were made under and are dropped when it moves.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

VERSION_FILE = "banks.version"


def bank_version(data_dir: Path) -> int:
    """The current counter; 0 before the first bank write."""
    try:
        return int((Path(data_dir) / VERSION_FILE).read_text(encoding="ascii") or 0)
    except FileNotFoundError:
        return 0


def bump_bank_version(data_dir: Path) -> int:
    """Count one bank change; returns the new counter.

    Writers serialise on a lock file; the value is replaced atomically, so a reader never
    sees a half-written counter.
    """
    path = Path(data_dir) / VERSION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(VERSION_FILE + ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        new = bank_version(data_dir) + 1
        staged = path.with_name(f"{VERSION_FILE}.{os.getpid()}.tmp")
        staged.write_text(str(new), encoding="ascii")
        os.replace(staged, path)
    return new
