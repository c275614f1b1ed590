"""The bank file and its in-memory index, the flood guard, and `cascade bank ...`."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cascade.cli import app
from cascade.hashbank import (
    BANK_FILE,
    BankError,
    EntryInput,
    FloodGuard,
    HashBank,
    MatchKind,
    Polarity,
    Shingler,
    entry_from_record,
)
from cascade.normalize import normalize

THREAT = "I know where you live and I will hurt your family tonight"
SPAM = "Congratulations you won a free cruise call now to claim your prize"


def bad(entry_id: str, text: str, *categories: str) -> EntryInput:
    return EntryInput(entry_id, text, Polarity.BAD, categories or ("violence",), "test")


def good(entry_id: str, text: str) -> EntryInput:
    return EntryInput(entry_id, text, Polarity.GOOD, (), "test")


@pytest.fixture
def bank(tmp_path: Path) -> Iterator[HashBank]:
    opened = HashBank.open(tmp_path, near_threshold=0.7)
    opened.upsert([bad("threat-1", THREAT), bad("spam-1", SPAM, "spam"), good("ok-1", "have a lovely day")], "tester")
    yield opened
    opened.close()


@pytest.mark.parametrize(
    "variant",
    [
        THREAT,
        THREAT.upper() + "!!!",
        "І knοw whеrе уοu lіvе and І will hurt уοur family tοnight",  # Cyrillic/Greek homoglyphs
        "I kn\u200bow wh\u200dere you li\ufeffve and I will hurt your family tonight",
        "I kn0w wh3r3 y0u l1v3 and I w1ll hur7 y0ur fam1ly 70n1gh7",
        "I  know where you live   and I will h.u.r.t your family toniiiight",
    ],
)
def test_disguised_copy_is_an_exact_hit(bank: HashBank, variant: str) -> None:
    hits = bank.lookup(normalize(variant))
    assert [(h.entry_id, h.kind, h.polarity) for h in hits] == [("threat-1", MatchKind.EXACT, Polarity.BAD)]
    assert hits[0].categories == ("violence",)


def test_edited_copy_is_a_near_hit_and_unrelated_text_is_not(bank: HashBank) -> None:
    edited = "I know where you live and I will hurt your whole family tonight"
    hits = bank.lookup(normalize(edited))
    assert [(h.entry_id, h.kind) for h in hits] == [("threat-1", MatchKind.NEAR)]
    assert 0.7 <= hits[0].jaccard < 1.0
    for unrelated in ["I know where you work", "your family tonight", "what a lovely family dinner tonight"]:
        assert bank.lookup(normalize(unrelated)) == []


def test_threshold_is_configurable(tmp_path: Path) -> None:
    loose = HashBank(tmp_path / "loose.sqlite", near_threshold=0.3)
    strict = HashBank(tmp_path / "strict.sqlite", near_threshold=0.95)
    for opened in (loose, strict):
        opened.upsert([bad("threat-1", THREAT)], "tester")
    query = normalize("I know where you live and I will find your family")
    assert [h.entry_id for h in loose.lookup(query)] == ["threat-1"]
    assert strict.lookup(query) == []


def test_persists_across_reopen_without_rehashing(tmp_path: Path, bank: HashBank) -> None:
    assert bank.quarantine("spam-1", "flood guard: test", 3600)
    bank.close()

    class CountingShingler(Shingler):
        calls = 0

        def signature(self, normalized: str) -> np.ndarray | None:
            CountingShingler.calls += 1
            return super().signature(normalized)

    reopened = HashBank(tmp_path / BANK_FILE, near_threshold=0.7, shingler=CountingShingler())
    assert CountingShingler.calls == 0  # the index came from stored signatures
    assert len(reopened) == 3
    assert [h.entry_id for h in reopened.lookup(normalize(THREAT + " lol"))] == ["threat-1"]
    assert CountingShingler.calls == 1  # the query's own signature
    spam = reopened.get("spam-1")
    assert spam is not None and spam.quarantined and spam.quarantine_reason == "flood guard: test"
    assert reopened.lookup(normalize(SPAM))[0].quarantined
    reopened.close()


def test_reopen_recomputes_keys_written_by_an_older_normaliser(tmp_path: Path, bank: HashBank) -> None:
    bank.close()
    with sqlite3.connect(tmp_path / BANK_FILE) as db:
        db.execute("UPDATE entries SET normalized = 'stale', text_key = 'stale', signature = NULL")
        db.execute("UPDATE meta SET value = 'old' WHERE key = 'normalize_version'")
    reopened = HashBank.open(tmp_path)
    assert [h.kind for h in reopened.lookup(normalize(THREAT))] == [MatchKind.EXACT]
    assert [h.kind for h in reopened.lookup(normalize(THREAT + " lol"))] == [MatchKind.NEAR]
    reopened.close()


def test_upsert_is_idempotent_by_id(bank: HashBank) -> None:
    again = bank.upsert([bad("threat-1", THREAT), bad("spam-1", SPAM, "spam")], "tester")
    assert (again.added, again.updated, again.unchanged) == (0, 0, 2)
    assert len(bank) == 3

    recategorised = bank.upsert([bad("threat-1", THREAT, "violence", "harassment")], "tester")
    assert (recategorised.added, recategorised.updated) == (0, 1)
    assert bank.lookup(normalize(THREAT))[0].categories == ("harassment", "violence")

    # A new text under the same id replaces the old one and drops its quarantine.
    bank.quarantine("threat-1", "test", 3600)
    bank.upsert([bad("threat-1", "a completely different threatening sentence here")], "tester")
    assert bank.lookup(normalize(THREAT)) == []
    entry = bank.get("threat-1")
    assert entry is not None and not entry.quarantined


def test_duplicate_ids_in_one_batch_keep_the_last(tmp_path: Path) -> None:
    opened = HashBank.open(tmp_path)
    report = opened.upsert([bad("x", THREAT), bad("x", SPAM, "spam")], "tester")
    assert (report.added, report.updated) == (1, 1)
    assert [h.entry_id for h in opened.lookup(normalize(SPAM))] == ["x"]
    assert opened.lookup(normalize(THREAT)) == []


def test_remove_and_re_add(bank: HashBank) -> None:
    assert bank.remove("threat-1")
    assert not bank.remove("threat-1")
    assert bank.lookup(normalize(THREAT)) == []
    assert bank.get("threat-1") is None
    assert bank.stats().removed == 1
    report = bank.upsert([bad("threat-1", THREAT)], "tester")
    assert report.added == 1
    assert bank.lookup(normalize(THREAT))[0].entry_id == "threat-1"


def test_another_process_sees_writes_after_refresh(tmp_path: Path, bank: HashBank) -> None:
    other = HashBank.open(tmp_path)
    other.upsert([bad("new-1", "a brand new threatening message about the school")], "other")
    other.remove("spam-1")
    other.quarantine("threat-1", "flood", 3600)
    assert bank.lookup(normalize(SPAM)) != []  # not seen before refresh
    bank.refresh()
    assert [h.entry_id for h in bank.lookup(normalize("a brand new threatening message about the school"))] == ["new-1"]
    assert bank.lookup(normalize(SPAM)) == []
    assert bank.lookup(normalize(THREAT))[0].quarantined
    other.close()


def test_a_quarantine_expires(bank: HashBank) -> None:
    assert bank.quarantine("threat-1", "flood", 1)
    assert bank.lookup(normalize(THREAT))[0].quarantined
    assert bank.stats().quarantined == 1
    time.sleep(2.1)  # timestamps have one-second resolution
    assert not bank.lookup(normalize(THREAT))[0].quarantined
    assert bank.stats().quarantined == 0 and not bank.entries(quarantined_only=True)
    assert bank.quarantine("threat-1", "flood again", 3600)  # an expired quarantine may be renewed


def test_quarantine_and_confirm(bank: HashBank) -> None:
    assert bank.quarantine("threat-1", "flood", 3600)
    assert not bank.quarantine("threat-1", "flood", 3600)  # already
    assert [e.id for e in bank.entries(quarantined_only=True)] == ["threat-1"]
    assert bank.confirm("threat-1")
    assert not bank.quarantine("threat-1", "flood", 3600)  # confirmed entries are never quarantined again
    entry = bank.get("threat-1")
    assert entry is not None and entry.confirmed and not entry.quarantined
    assert not bank.confirm("no-such-entry")


def test_stats(bank: HashBank) -> None:
    bank.quarantine("spam-1", "flood", 3600)
    stats = bank.stats()
    assert stats.by_polarity == {"bad": 2, "good": 1}
    assert stats.by_category == {"spam": 1, "violence": 1}
    assert (stats.quarantined, stats.confirmed, stats.removed) == (1, 0, 0)


def test_entries_that_could_never_match_are_refused() -> None:
    with pytest.raises(BankError, match="no letters or digits"):
        bad("x", "😂😂 !!!")
    with pytest.raises(BankError, match="non-empty id"):
        bad(" ", THREAT)


def test_entry_from_record_shapes() -> None:
    labelled = {"id": "d-1", "text": "t", "flagged": 1, "labels": {"hate": 0, "offensive": 1}, "source": "davidson"}
    entry = entry_from_record(labelled)
    assert (entry.polarity, entry.categories, entry.source) == (Polarity.BAD, ("offensive",), "davidson")
    benign = entry_from_record({"id": "d-2", "text": "t", "flagged": 0, "labels": {"hate": 0}}, "file.jsonl")
    assert (benign.polarity, benign.categories, benign.source) == (Polarity.GOOD, (), "file.jsonl")
    banked = entry_from_record({"id": "b-1", "text": "t", "polarity": "bad", "categories": ["spam"]})
    assert (banked.polarity, banked.categories) == (Polarity.BAD, ("spam",))
    for broken in [
        [],
        {"id": 1, "text": "t", "flagged": 1},
        {"id": "x", "text": "t"},
        {"id": "x", "text": "t", "polarity": "meh"},
    ]:
        with pytest.raises(BankError):
            entry_from_record(broken)


def test_flood_guard_window() -> None:
    guard = FloodGuard(window=10, share=0.3, min_items=5)
    assert guard.record(["a"]) == []  # fewer than min_items seen
    for _ in range(5):
        guard.record([])
    assert guard.record(["a"]) == []  # 2 of 7 items: not more than 30%
    assert guard.record(["a", "a"]) == ["a"]  # 3 of 8: more than 30%; an item counts an entry once
    assert guard.count("a") == 3
    for i in range(10):
        guard.record(["b"] if i % 2 else [])
    assert guard.count("a") == 0 and guard.count("b") == 5 and len(guard) == 10  # "a" slid out


# ----- CLI ---------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("CASCADE_DATA_DIR", str(tmp_path / "data"))
    return CliRunner()


def _write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def test_cli_import_is_idempotent_and_reports_errors(cli: CliRunner, tmp_path: Path) -> None:
    source = _write_jsonl(
        tmp_path / "labelled.jsonl",
        [
            {"id": "d-1", "text": THREAT, "flagged": 1, "labels": {"violence": 1, "hate": 0}, "source": "x"},
            {"id": "d-2", "text": "have a lovely day", "flagged": 0, "labels": {"violence": 0}},
            "{not json",
            {"id": "d-3", "text": "!!!", "flagged": 1, "labels": {}},
            {"id": "b-1", "text": SPAM, "polarity": "bad", "categories": ["spam", "brand_new_category"]},
        ],
    )
    first = cli.invoke(app, ["bank", "import", str(source)])
    assert first.exit_code == 0, first.output
    assert "added" in first.output and "│     3 │" in first.output
    assert "labelled.jsonl:3: not valid JSON" in first.output
    assert "labelled.jsonl:4" in first.output
    assert "brand_new_category" in first.output

    second = cli.invoke(app, ["bank", "import", str(source), "--kind", "hash"])
    assert second.exit_code == 0
    assert "skipped (unchanged)    │     3" in second.output

    bank = HashBank.open(tmp_path / "data")
    assert bank.stats().by_polarity == {"bad": 2, "good": 1}
    assert bank.lookup(normalize(THREAT))[0].categories == ("violence",)
    bank.close()


def test_cli_import_by_split(cli: CliRunner, tmp_path: Path) -> None:
    from cascade.data import Split, split_of

    rows = [{"id": f"r-{i}", "text": f"message number {i} here", "flagged": 0, "labels": {}} for i in range(40)]
    source = _write_jsonl(tmp_path / "rows.jsonl", rows)
    result = cli.invoke(app, ["bank", "import", str(source), "--split", "train"])
    assert result.exit_code == 0, result.output
    bank = HashBank.open(tmp_path / "data")
    assert len(bank) == sum(split_of(r["id"]) is Split.TRAIN for r in rows)
    bank.close()


def test_cli_add_list_stats_confirm_remove(cli: CliRunner, tmp_path: Path) -> None:
    added = cli.invoke(app, ["bank", "add", "Fr33 c@sh, cl1ck n0w", "--bad", "-c", "spam", "--id", "spam-7"])
    assert added.exit_code == 0, added.output
    assert "added: spam-7" in added.output
    assert cli.invoke(app, ["bank", "add", "have a lovely day", "--good"]).exit_code == 0

    listed = cli.invoke(app, ["bank", "list"])
    assert "spam-7" in listed.output and "good-" in listed.output
    stats = cli.invoke(app, ["bank", "stats"])
    assert "spam" in stats.output

    bank = HashBank.open(tmp_path / "data")
    assert [h.entry_id for h in bank.lookup(normalize("free cash click now"))] == ["spam-7"]
    assert not bank.quarantine("spam-7", "flood", 3600)  # an operator added it: confirmed
    bank.upsert([EntryInput("auto-1", SPAM, Polarity.BAD, ("spam",))], "review-feedback")
    assert bank.quarantine("auto-1", "flood guard: test", 3600)
    bank.close()
    assert "auto-1" in cli.invoke(app, ["bank", "list", "--quarantined"]).output
    stats = cli.invoke(app, ["bank", "stats"])
    assert "quarantined auto-1 until 20" in stats.output and "flood guard: test" in stats.output
    confirmed = cli.invoke(app, ["bank", "confirm", "auto-1"])
    assert confirmed.exit_code == 0 and "was quarantined" in confirmed.output
    assert "auto-1" not in cli.invoke(app, ["bank", "list", "--quarantined"]).output
    assert cli.invoke(app, ["bank", "remove", "spam-7"]).exit_code == 0
    assert "spam-7" not in cli.invoke(app, ["bank", "list"]).output


@pytest.mark.parametrize(
    "args",
    [
        ["bank", "import", "/no/such/file.jsonl"],
        ["bank", "add", "some text", "--bad", "-c", "not_a_category"],
        ["bank", "add", "some text", "--good", "-c", "spam"],
        ["bank", "add", "😂😂", "--bad"],
        ["bank", "remove", "no-such-id"],
        ["bank", "confirm", "no-such-id"],
    ],
)
def test_cli_operator_errors_exit_2(cli: CliRunner, args: list[str]) -> None:
    result = cli.invoke(app, args)
    assert result.exit_code == 2
    assert "error:" in result.output


def test_cli_import_confirm_and_nothing_imported(cli: CliRunner, tmp_path: Path) -> None:
    entries = tmp_path / "entries.jsonl"
    entries.write_text(json.dumps({"id": "c-1", "text": SPAM, "polarity": "bad", "categories": ["spam"]}) + "\n")
    assert cli.invoke(app, ["bank", "import", str(entries), "--confirm"]).exit_code == 0
    bank = HashBank.open(tmp_path / "data")
    entry = bank.get("c-1")
    assert entry is not None and entry.confirmed and not bank.quarantine("c-1", "flood", 3600)
    bank.close()
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("not json\n{}\n")
    failed = cli.invoke(app, ["bank", "import", str(only_bad)])
    assert failed.exit_code == 2 and "nothing imported" in failed.output


def _open_when_told(path: str, go: Any, outcomes: Any) -> None:
    go.wait()
    try:
        HashBank(Path(path))
        outcomes.put("ok")
    except Exception as exc:  # what the parent asserts on
        outcomes.put(repr(exc))


def test_processes_starting_together_open_a_new_bank_file(tmp_path: Path) -> None:
    """Stream workers start at once on one data dir: setting up a new bank file must not fail any of them
    (without the setup lock, 24 of 120 opens failed with "database is locked", 3 processes at a time)."""
    forked = multiprocessing.get_context("fork")
    for attempt in range(8):
        go, outcomes = forked.Event(), forked.Queue()
        path = str(tmp_path / f"bank-{attempt}.sqlite")
        openers = [forked.Process(target=_open_when_told, args=(path, go, outcomes)) for _ in range(3)]
        for process in openers:
            process.start()
        time.sleep(0.2)  # every opener waiting
        go.set()
        for process in openers:
            process.join(60)
        assert [outcomes.get(timeout=5) for _ in openers] == ["ok"] * 3
