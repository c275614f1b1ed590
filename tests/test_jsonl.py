"""The one JSONL reader: blank lines, line numbers, and errors that name file:line."""

from __future__ import annotations

import io
from pathlib import Path

from cascade.jsonl import JsonlError, raw_records, read_jsonl


def test_blank_lines_separate_records_and_line_numbers_count_them() -> None:
    stream = io.BytesIO(b'{"a": 1}\r\n\n   \n{"b": 2}\n\t\n{"c": 3}')
    sizes: list[int] = []
    records = list(raw_records(stream, sizes.append))
    assert records == [(1, b'{"a": 1}'), (4, b'{"b": 2}'), (6, b'{"c": 3}')]
    assert sum(sizes) == len(stream.getvalue())  # every byte is reported read, blank lines too


def test_bad_lines_come_back_as_errors_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": "a"}\n\n{"id": \n\xff\xfe\n[1, 2]\n')
    values = list(read_jsonl(path))
    assert values[0] == (1, {"id": "a"})  # a leading BOM is not part of the value
    assert values[3] == (5, [1, 2])
    bad_json, bad_utf8 = values[1][1], values[2][1]
    assert isinstance(bad_json, JsonlError) and str(bad_json).startswith(f"{path}:3: not valid JSON (")
    assert isinstance(bad_utf8, JsonlError) and str(bad_utf8) == f"{path}:4: not valid UTF-8"
