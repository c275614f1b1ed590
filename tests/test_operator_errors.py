"""Every operator mistake: one line naming the problem and the fix, exit code 2, no traceback.

Each case runs the installed `cascade` entry point (or `python -m cascade.stream`, what the
workers run) as a subprocess, as an operator would, from a scratch directory. The cases run
concurrently (each is a process start, seconds on a loaded machine); one test per case checks it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cascade.stream.broker import EmbeddedBroker, free_port

CASCADE = str(Path(sys.executable).with_name("cascade"))
WORKER = [sys.executable, "-m", "cascade.stream"]


@dataclass(frozen=True)
class Case:
    args: list[str]
    says: str  # a fragment the error line must contain: the thing named, or the fix
    env: dict[str, str] = field(default_factory=dict)
    lines: int = 1  # lines on stderr; 0: more than the error line (a report, a failed worker's log)


def cases(scratch: Path, broker_url: str) -> dict[str, Case]:
    refused = f"127.0.0.1:{free_port()}"  # nothing listens there
    items = scratch / "items.jsonl"
    items.write_text(json.dumps({"id": "a", "text": "hello"}) + "\n")
    binary = scratch / "thresholds.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    broken_bank = scratch / "bad-data"
    (broken_bank / "banks.sqlite").mkdir(parents=True)  # a directory where the bank file belongs
    bad_import = scratch / "entries.jsonl"
    bad_import.write_text("not json\n{}\n[1]\n")
    return {
        "publish, refused broker": Case(["publish", str(items), "--broker", refused], "cannot use the Kafka broker"),
        "tail, refused broker": Case(["tail", "--broker", refused], "cannot use the Kafka broker"),
        "worker, refused broker": Case(
            [*WORKER, "--broker", refused, "--stages", "hash", "--cascade", "hash"], "cannot use the Kafka broker"
        ),
        "cascade worker, refused broker": Case(
            ["worker", "--broker", refused, "--stages", "hash", "--cascade", "hash"], "check --broker"
        ),
        "run, refused broker": Case(["run", "--broker", refused, "--stages", "hash"], "cannot use the Kafka broker"),
        "broker port not a number": Case(["tail", "--broker", "127.0.0.1:abc"], "127.0.0.1:abc"),
        "worker, broker port not a number": Case([*WORKER, "--broker", "127.0.0.1:abc"], "fix --broker"),
        "tail, no topics": Case(["tail", "--broker", broker_url], "start a worker first"),
        "moderate -o into a missing directory": Case(
            ["moderate", str(items), "-o", str(scratch / "missing" / "x.jsonl")], "does not exist"
        ),
        "malformed CASCADE_LLM_BUDGET_ITEMS": Case(
            ["moderate", str(items), "--stages", "hash"], "CASCADE_LLM_BUDGET_ITEMS", {"CASCADE_LLM_BUDGET_ITEMS": "x"}
        ),
        "malformed CASCADE_STREAM_CONCURRENCY": Case(
            ["run", "--stages", "hash"], "stream_concurrency", {"CASCADE_STREAM_CONCURRENCY": "llm=4"}
        ),
        "worker, malformed CASCADE_STREAM_CONCURRENCY": Case(
            [*WORKER, "--broker", refused], "stream_concurrency", {"CASCADE_STREAM_CONCURRENCY": "{"}
        ),
        "missing CASCADE_CONFIG file": Case(
            ["moderate", str(items)], "CASCADE_CONFIG", {"CASCADE_CONFIG": str(scratch / "nope.yaml")}
        ),
        "binary thresholds file": Case(["moderate", str(items), "--thresholds", str(binary)], str(binary)),
        "run, binary thresholds file": Case(["run", "--thresholds", str(binary)], str(binary)),
        "duplicate stages": Case(["moderate", str(items), "--stages", "hash,hash"], "more than once"),
        "stages out of order": Case(["run", "--stages", "classifier,hash"], "hash,classifier"),
        "unknown stage": Case(["moderate", str(items), "--stages", "hash,magic"], "magic"),
        "line limit over the message limit": Case(
            ["moderate", str(items)], "CASCADE_MAX_LINE_BYTES", {"CASCADE_MAX_LINE_BYTES": "5000000"}
        ),
        "bank import with no importable line": Case(
            ["bank", "import", str(bad_import)],
            "nothing imported",
            lines=0,  # after its report of each bad line
        ),
        "--workers 2 with no stage to share": Case(
            ["run", "--stages", "retrieval", "--workers", "2"], "CASCADE_QDRANT_URL"
        ),
        "run, a worker that cannot start": Case(
            ["run", "--stages", "hash", "--broker", broker_url, "--loglevel", "warning"],
            "worker exited with code 2",
            {"CASCADE_DATA_DIR": str(broken_bank)},
            lines=0,  # its own line, then the worker's last log lines
        ),
    }


@dataclass(frozen=True)
class Result:
    code: int
    stderr: str
    stdout: str


def run_case(case: Case, scratch: Path) -> Result:
    command = case.args if case.args[0] == sys.executable else [CASCADE, *case.args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CASCADE_", "OPENAI_"))}
    env |= {"CASCADE_DATA_DIR": str(scratch / "data"), "NO_COLOR": "1", "COLUMNS": "400", **case.env}
    done = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=120)
    return Result(done.returncode, done.stderr, done.stdout)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Case, Result]]]:
    scratch = tmp_path_factory.mktemp("operator")
    with EmbeddedBroker() as broker:
        table = cases(scratch, broker.url)
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {name: pool.submit(run_case, case, scratch) for name, case in table.items()}
            yield {name: (table[name], future.result()) for name, future in futures.items()}


def _case_names() -> list[str]:
    with tempfile.TemporaryDirectory() as probe:
        return list(cases(Path(probe), "127.0.0.1:1"))


@pytest.mark.slow
@pytest.mark.parametrize("name", _case_names())
def test_operator_error_is_one_line_exit_2_no_traceback(name: str, outcomes: dict[str, tuple[Case, Result]]) -> None:
    case, result = outcomes[name]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.code == 2, (result.code, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout
    (error,) = [line for line in lines if line.startswith("error: ")]
    assert case.says in error, error
    if case.lines:
        assert len(lines) == case.lines, lines
