"""Processes sharing one data directory take turns through lock files (POSIX `flock`)."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def process_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) until the block ends; other
    processes (and other open files in this one) wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        yield
