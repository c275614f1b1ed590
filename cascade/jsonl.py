"""The one JSONL reader: every file of records (items, labelled rows, bank entries, verdicts) is read here.

A record is one line; blank lines separate records and are not records; line numbers count every
line, blank or not, so an error names the line an editor shows. Raw records keep their bytes
(the intake parser judges them and dead-letters what is wrong); a parsed record that is not
JSON comes back as a `JsonlError` naming `file:line`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

BOM = "\ufeff"


class JsonlError(ValueError):
    """A line that is not a JSON value; the message names `source:line` and what is wrong."""

    def __init__(self, source: str, lineno: int, problem: str) -> None:
        super().__init__(f"{source}:{lineno}: {problem}")
        self.source, self.lineno, self.problem = source, lineno, problem


def raw_records(stream: IO[bytes], on_read: Callable[[int], None] | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number, record bytes without the line end) per non-blank line; `on_read` gets every line's size."""
    for lineno, line in enumerate(stream, 1):
        if on_read is not None:
            on_read(len(line))
        record = line.rstrip(b"\r\n")
        if record.strip():
            yield lineno, record


def parse_value(record: bytes) -> object:
    """The JSON value of one record; a ValueError saying what is wrong (UTF-8, JSON) otherwise."""
    try:
        text = record.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    try:
        return json.loads(text.removeprefix(BOM))
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg}, column {exc.colno})") from None


def read_jsonl(path: Path, on_read: Callable[[int], None] | None = None) -> Iterator[tuple[int, object | JsonlError]]:
    """(line number, JSON value) per record of `path`; a `JsonlError` in place of a value that does not parse.

    The error is yielded, not raised: a reader that skips bad lines (bank import, drift) and one
    that stops at the first (`data.read_labelled`) share the loop.
    """
    with Path(path).open("rb") as fh:
        for lineno, record in raw_records(fh, on_read):
            try:
                yield lineno, parse_value(record)
            except ValueError as exc:
                yield lineno, JsonlError(str(path), lineno, str(exc))
