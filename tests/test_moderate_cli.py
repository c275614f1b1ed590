"""`cascade moderate` end to end: every input record → one verdict line or one dead-letter line."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cascade.assembly import build_runner
from cascade.cli import app
from cascade.cli.moderate import ModerationSummary, moderate_stream
from cascade.contract import DeadLetter, Verdict
from cascade.settings import Settings

GOOD = {"id": "ok-1", "text": "see you at the match tonight"}
SPAM = "WINNER!! You have won a free cruise, text CLAIM to 80082 now"


def write_input(path: Path) -> list[bytes]:
    lines = [
        json.dumps(GOOD).encode(),
        json.dumps({"id": "spam-1", "text": SPAM}).encode(),
        json.dumps({"id": "spam-2", "text": SPAM.upper().replace("O", "0")}).encode(),  # an evasive copy
        json.dumps(GOOD).encode(),  # a duplicate id: judged again, same verdict
        b"{not json",
        b'{"id": "x", "text": "\xff\xfe"}',
        json.dumps({"id": "empty", "text": "   "}).encode(),
        json.dumps({"id": "extra", "text": "hi", "score": 1}).encode(),
        b"",  # blank lines separate records, they are not records
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return [line for line in lines if line.strip()]


def jsonl_lines(text: str) -> list[str]:
    """Records of JSONL: split on newline only (str.splitlines would also split on U+0085 inside a string)."""
    return [line for line in text.split("\n") if line]


def cli(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={"CASCADE_DATA_DIR": str(tmp_path / "data")})
    return result.exit_code, result.stdout, result.stderr


def test_moderate_writes_one_line_per_record_and_blocks_a_banked_text(tmp_path: Path) -> None:
    code, _, err = cli(tmp_path, "bank", "add", SPAM, "--bad", "--category", "spam", "--id", "spam-entry")
    assert code == 0, err
    records = write_input(tmp_path / "in.jsonl")
    out = tmp_path / "verdicts.jsonl"

    code, _, err = cli(tmp_path, "moderate", str(tmp_path / "in.jsonl"), "-o", str(out), "--stages", "hash")

    assert code == 0, err
    verdicts = [Verdict.model_validate_json(line) for line in jsonl_lines(out.read_text())]
    letters = [
        DeadLetter.model_validate_json(line) for line in jsonl_lines(Path(f"{out}.deadletter.jsonl").read_text())
    ]
    assert len(verdicts) + len(letters) == len(records) == 8
    by_id = {}
    for v in verdicts:
        by_id.setdefault(v.id, []).append(v)
    assert sorted(by_id) == ["ok-1", "spam-1", "spam-2"] and len(by_id["ok-1"]) == 2
    assert by_id["spam-1"][0].decision == "block" and by_id["spam-1"][0].flagged_categories == ["spam"]
    assert by_id["spam-2"][0].decision == "block"  # normalisation folds the evasion
    # Only the hash stage runs here and it has no opinion on unknown text: a human decides.
    assert {v.decision for v in by_id["ok-1"]} == {"review"}
    assert sorted(letter.error_code.value for letter in letters) == [
        "empty_text",
        "invalid_utf8",
        "malformed_json",
        "unknown_field",
    ]
    assert all(letter.source and letter.source.startswith(str(tmp_path / "in.jsonl") + ":") for letter in letters)
    assert "dead letter" in err and "review" in err  # the summary on stderr


def test_operator_errors_exit_2_with_a_message(tmp_path: Path) -> None:
    code, _, err = cli(tmp_path, "moderate", str(tmp_path / "missing.jsonl"), "--stages", "hash")
    assert code == 2 and "input file not found" in err
    write_input(tmp_path / "in.jsonl")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: x\nstages: {hash: {flagged: {allow_below: 0.9, block_at: 0.1}}}\n")
    code, _, err = cli(tmp_path, "moderate", str(tmp_path / "in.jsonl"), "--thresholds", str(bad), "--stages", "hash")
    assert code == 2 and "allow_below" in err


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=80).map(lambda b: b.replace(b"\n", b" ")),
            st.fixed_dictionaries({"id": st.text(max_size=6), "text": st.text(max_size=40)}).map(
                lambda d: json.dumps(d).encode()
            ),
        ),
        max_size=30,
    )
)
def test_every_record_gets_exactly_one_output(tmp_path: Path, lines: list[bytes]) -> None:
    data_settings = Settings(data_dir=tmp_path / "prop")
    runner = build_runner(data_settings, stage_names=["hash"])
    verdicts, letters = io.StringIO(), io.StringIO()
    records = [(line, f"in:{i}") for i, line in enumerate(lines, 1)]

    async def go() -> None:
        try:
            await moderate_stream(runner, iter(records), data_settings, verdicts, letters, ModerationSummary(), 7)
        finally:
            await runner.aclose()

    asyncio.run(go())
    assert len(jsonl_lines(verdicts.getvalue())) + len(jsonl_lines(letters.getvalue())) == len(records)
