"""The one labelled-row parser (strict 0/1) and the one split choice, shared by every reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cascade.data import DataError, Split, SplitChoice, labelled_from_record, read_labelled, split_of

GOOD = {"id": "r1", "text": "hello", "flagged": 1, "labels": {"spam": 1, "hate": 0}, "source": "s"}


def test_a_labelled_row_parses() -> None:
    row = labelled_from_record(GOOD)
    assert (row.id, row.text, row.flagged, row.labels, row.source) == ("r1", "hello", 1, {"spam": 1, "hate": 0}, "s")
    assert labelled_from_record({**GOOD, "source": None}, default_source="file.jsonl").source == "file.jsonl"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"flagged": 2}, "'flagged' must be 0 or 1"),
        ({"flagged": True}, "'flagged' must be 0 or 1"),
        ({"flagged": 1.0}, "'flagged' must be 0 or 1"),
        ({"flagged": "1"}, "'flagged' must be 0 or 1"),
        ({"labels": {"spam": True}}, "'labels' must map"),
        ({"labels": {"spam": 2}}, "'labels' must map"),
        ({"text": "  "}, "missing or empty 'text'"),
        ({"id": ""}, "missing or empty 'id'"),
    ],
)
def test_anything_but_strict_0_1_is_refused(change: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        labelled_from_record({**GOOD, **change})


def test_files_go_through_the_same_parser(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "id": "r2", "flagged": 2}) + "\n")
    rows = read_labelled(path)
    assert next(rows).id == "r1"  # blank lines are skipped
    with pytest.raises(DataError, match=r"rows.jsonl:3: .*'flagged' must be 0 or 1"):
        next(rows)


def test_split_choice_keeps_its_split_or_everything() -> None:
    ids = [f"id-{n}" for n in range(200)]
    for split in Split:
        assert [i for i in ids if SplitChoice(split.value).keeps(i)] == [i for i in ids if split_of(i) is split]
    assert all(SplitChoice.ALL.keeps(i) for i in ids)
