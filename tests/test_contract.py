"""The published contract: schemas are current, thresholds files are validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascade.assembly import STAGE_ORDER
from cascade.contract import json_schemas
from cascade.policy import load_policy
from cascade.settings import PROJECT_ROOT, Settings
from cascade.thresholds import Band, ThresholdError, ThresholdSet


def test_checked_in_json_schemas_are_current() -> None:
    for name, text in json_schemas().items():
        path = PROJECT_ROOT / "schemas" / name
        assert path.exists(), f"{name} missing: run `cascade schemas`"
        assert path.read_text(encoding="utf-8") == text, f"{name} is stale: run `cascade schemas`"


def test_verdict_schema_forbids_unknown_fields_and_lists_decisions() -> None:
    import json

    verdict = json.loads(json_schemas()["verdict.schema.json"])
    assert verdict["additionalProperties"] is False
    assert verdict["$defs"]["Decision"]["enum"] == ["allow", "block", "review"]


def test_shipped_thresholds_and_policy_are_valid_together() -> None:
    settings = Settings()
    policy = load_policy(settings.policies_dir)
    assert policy.version and "flagged" in policy.names
    ThresholdSet.load(settings.thresholds).check_names(STAGE_ORDER, policy.names)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: x\nstages:\n  hash: {flagged: {allow_below: 0.9, block_at: 0.1}}\n", "must be <= block_at"),
        ("version: x\nstages:\n  hash: {flagged: {allow_below: -0.1}}\n", "greater than or equal to 0"),
        ("version: x\nstages:\n  hash: {flagged: {block_at: 1.5}}\n", "less than or equal to 1"),
        ("stages: {}\n", "version"),
        ("- a list\n", "must hold a mapping"),
        ("version: x\nstages: {hash: {flagged: {allow_blow: 0.1}}}\n", "allow_blow"),
        ("version: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_threshold_files_fail_with_a_clear_message(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(ThresholdError, match=r"invalid|must hold|not valid") as info:
        ThresholdSet.load(path)
    assert message in str(info.value)


def test_unknown_stage_or_category_names_are_rejected() -> None:
    bad_stage = ThresholdSet(version="v", stages={"hsah": {}})
    with pytest.raises(ThresholdError, match="unknown stage 'hsah'"):
        bad_stage.check_names(STAGE_ORDER, {"flagged"})
    bad_category = ThresholdSet(version="v", stages={"hash": {"spma": Band(allow_below=0.1)}})
    with pytest.raises(ThresholdError, match="unknown category 'spma'"):
        bad_category.check_names(STAGE_ORDER, {"flagged", "spam"})


def test_missing_threshold_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ThresholdError, match="not found"):
        ThresholdSet.load(tmp_path / "nope.yaml")


def test_threshold_set_round_trips_through_yaml(tmp_path: Path) -> None:
    original = ThresholdSet(
        version="v2",
        provenance={"targets": {"block_precision": 0.95}},
        stages={"classifier": {"flagged": Band(allow_below=0.1, block_at=None)}},
    )
    original.dump(tmp_path / "t.yaml")
    assert ThresholdSet.load(tmp_path / "t.yaml") == original
