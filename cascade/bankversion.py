"""A counter of bank changes, shared by every process that uses one data directory.

Every write to a bank (hash entries added, changed, removed, quarantined or confirmed;
exemplars imported or seeded) bumps it. Judgements cached against the banks
(`cascade.repeats`) carry the counter they were made under and are dropped when it moves.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cascade.locks import process_lock

VERSION_FILE = "banks.version"


# path -> (the file's identity when last read, its counter). A writer replaces the file, so an
# unchanged (inode, mtime, size) means an unchanged counter: polled every batch by every stage of a
# worker, one stat() replaces an open-read-close. File times are coarse (a few ms) and inodes are
# reused, so a file changed within the last second is read again rather than trusted ("racy" entry).
_read: dict[str, tuple[tuple[int, int, int], int]] = {}
_RACY_NS = 1_000_000_000


def bank_version(data_dir: Path) -> int:
    """The current counter; 0 before the first bank write."""
    path = os.path.join(data_dir, VERSION_FILE)
    try:
        stat = os.stat(path)
        identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        known = _read.get(path)
        if known is not None and known[0] == identity:
            return known[1]
        value = int(Path(path).read_text(encoding="ascii") or 0)
    except FileNotFoundError:
        return 0
    if time.time_ns() - stat.st_mtime_ns > _RACY_NS:
        _read[path] = (identity, value)
    return value


def bump_bank_version(data_dir: Path) -> int:
    """Count one bank change; returns the new counter.

    Writers serialise on a lock file; the value is replaced atomically, so a reader never
    sees a half-written counter.
    """
    path = Path(data_dir) / VERSION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with process_lock(path.with_name(VERSION_FILE + ".lock")):
        new = bank_version(data_dir) + 1
        staged = path.with_name(f"{VERSION_FILE}.{os.getpid()}.tmp")
        staged.write_text(str(new), encoding="ascii")
        os.replace(staged, path)
    return new
