"""The edge invariant: any bytes → exactly one ContentItem or one DeadLetter, never an exception."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.contract import ContentItem, DeadLetter, DeadLetterCode
from cascade.intake import parse_record
from cascade.settings import Settings, SettingsError

SETTINGS = Settings(max_text_bytes=1024, max_line_bytes=8192, max_metadata_depth=8)


def parse(raw: bytes | str, **overrides: object) -> ContentItem | DeadLetter:
    cfg = SETTINGS.model_copy(update=overrides) if overrides else SETTINGS
    return parse_record(raw, cfg, source="test:1")


def code_of(raw: bytes | str, **overrides: object) -> DeadLetterCode:
    result = parse(raw, **overrides)
    assert isinstance(result, DeadLetter), f"expected a dead letter, got {result!r}"
    return result.error_code


def test_valid_item_with_all_fields() -> None:
    item = parse(
        json.dumps(
            {
                "id": "p-1",
                "text": "hello there",
                "lang": "en",
                "author_id": "u9",
                "context": "reply to a post",
                "metadata": {"channel": "comments", "n": [1, 2]},
                "created_at": "2026-11-27T10:00:00Z",
            }
        )
    )
    assert isinstance(item, ContentItem)
    assert item.id == "p-1" and item.metadata == {"channel": "comments", "n": [1, 2]}
    assert item.created_at is not None and item.created_at.year == 2026


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\xff\xfe{}", DeadLetterCode.INVALID_UTF8),
        (b"{not json", DeadLetterCode.MALFORMED_JSON),
        (b"", DeadLetterCode.MALFORMED_JSON),
        (b"[1, 2]", DeadLetterCode.NOT_AN_OBJECT),
        (b'"just a string"', DeadLetterCode.NOT_AN_OBJECT),
        (b'{"text": "x"}', DeadLetterCode.MISSING_FIELD),
        (b'{"id": "a"}', DeadLetterCode.MISSING_FIELD),
        (b'{"id": 5, "text": "x"}', DeadLetterCode.WRONG_TYPE),
        (b'{"id": "a", "text": ["x"]}', DeadLetterCode.WRONG_TYPE),
        (b'{"id": "a", "text": "x", "metadata": [1]}', DeadLetterCode.WRONG_TYPE),
        (b'{"id": "a", "text": "x", "created_at": 1700000000}', DeadLetterCode.WRONG_TYPE),
        (b'{"id": "a", "text": "x", "created_at": "yesterday"}', DeadLetterCode.INVALID_VALUE),
        (b'{"id": "a", "text": ""}', DeadLetterCode.EMPTY_TEXT),
        (b'{"id": "a", "text": " \\t\\n "}', DeadLetterCode.EMPTY_TEXT),
        (b'{"id": "a", "text": "\\u0000\\u200b"}', DeadLetterCode.EMPTY_TEXT),
        (b'{"id": "", "text": "x"}', DeadLetterCode.INVALID_VALUE),
        (b'{"id": "   ", "text": "x"}', DeadLetterCode.INVALID_VALUE),
        (b'{"id": "a", "text": "\\ud800"}', DeadLetterCode.INVALID_TEXT),
        (b'{"id": "a", "text": "x", "flagged": 1}', DeadLetterCode.UNKNOWN_FIELD),
        (b"[" * 4000 + b"]" * 4000, DeadLetterCode.MALFORMED_JSON),  # deeper than the parser recurses
        (b'{"id": "a", "text": "x", "metadata": {"n": NaN}}', DeadLetterCode.MALFORMED_JSON),  # not JSON
        (b'{"id": "a", "text": "x", "metadata": {"n": -Infinity}}', DeadLetterCode.MALFORMED_JSON),
        (b'{"id": "a", "text": "x", "metadata": {"n": [Infinity]}}', DeadLetterCode.MALFORMED_JSON),
        (b"\xef\xbb\xbf\xef\xbb\xbf{}", DeadLetterCode.MALFORMED_JSON),  # only one leading BOM is stripped
    ],
)
def test_bad_records_get_a_coded_dead_letter(raw: bytes, code: DeadLetterCode) -> None:
    assert code_of(raw) is code


def test_a_leading_byte_order_mark_is_not_part_of_the_record() -> None:
    item = parse(b"\xef\xbb\xbf" + json.dumps({"id": "bom-1", "text": "first line of a Windows file"}).encode())
    assert isinstance(item, ContentItem) and item.id == "bom-1"


@pytest.mark.parametrize(
    "payload",
    [
        b'{"id": "q", "text": "' + b'\\"' * 40_000 + b'"}',  # quotes: JSON escaping doubles them again
        bytes(range(0x80, 0x100)) * 400,  # invalid UTF-8: base64 adds a third
        b"\x01" * 60_000,  # control characters: six bytes each once escaped
    ],
)
def test_a_dead_letter_fits_in_one_message_whatever_its_payload(payload: bytes) -> None:
    limits = Settings(stream_max_message_bytes=64 * 1024)
    letter = parse_record(payload, limits, source="test:1")
    assert isinstance(letter, DeadLetter)
    assert len(letter.model_dump_json().encode()) <= limits.max_value_bytes
    assert letter.payload_truncated and letter.payload_bytes == len(payload)
    kept = base64.b64decode(letter.payload) if letter.payload_encoding == "base64" else letter.payload.encode()
    assert payload.startswith(kept) and len(kept) > limits.max_value_bytes // 8


def test_record_limits_derive_from_the_message_limit() -> None:
    derived = Settings(stream_max_message_bytes=200_000)
    assert derived.line_limit == derived.max_value_bytes < 200_000
    with pytest.raises(SettingsError, match="CASCADE_MAX_LINE_BYTES"):
        Settings(stream_max_message_bytes=200_000, max_line_bytes=300_000)
    with pytest.raises(SettingsError, match="CASCADE_MAX_TEXT_BYTES"):
        Settings(max_line_bytes=8192, max_text_bytes=10_000)


def test_text_limit_counts_utf8_bytes_not_characters() -> None:
    ok = json.dumps({"id": "a", "text": "é" * 512})  # 1024 bytes
    assert isinstance(parse(ok), ContentItem)
    too_big = json.dumps({"id": "a", "text": "é" * 513})
    assert code_of(too_big) is DeadLetterCode.TEXT_TOO_LARGE


def test_oversized_line_is_rejected_before_parsing_and_truncated_in_the_dead_letter() -> None:
    raw = json.dumps({"id": "a", "text": "x" * 10_000}).encode()
    letter = parse(raw)
    assert isinstance(letter, DeadLetter)
    assert letter.error_code is DeadLetterCode.LINE_TOO_LARGE
    assert letter.payload_truncated and len(letter.payload) == SETTINGS.max_line_bytes
    assert letter.payload_bytes == len(raw)


def test_deep_metadata_is_rejected() -> None:
    deep: dict = {}
    node = deep
    for _ in range(20):
        node["k"] = {}
        node = node["k"]
    letter = parse(json.dumps({"id": "a", "text": "x", "metadata": deep}))
    assert isinstance(letter, DeadLetter) and letter.error_code is DeadLetterCode.INVALID_VALUE
    assert letter.id == "a"


def test_unknown_fields_are_dropped_when_not_strict() -> None:
    item = parse(b'{"id": "a", "text": "x", "flagged": 1}', reject_unknown_fields=False)
    assert isinstance(item, ContentItem) and item.id == "a"


def test_invalid_utf8_payload_is_kept_as_base64() -> None:
    raw = b'{"id": "a", "text": "\xc3\x28"}'
    letter = parse(raw)
    assert isinstance(letter, DeadLetter) and letter.payload_encoding == "base64"
    assert base64.b64decode(letter.payload) == raw


def test_dead_letter_names_the_item_when_it_can() -> None:
    letter = parse(b'{"id": "item-7", "text": "   "}')
    assert isinstance(letter, DeadLetter) and letter.id == "item-7" and letter.source == "test:1"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
records = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=20), st.integers(), st.none()),
        "text": st.one_of(st.text(max_size=200), st.integers(), json_values),
        "lang": st.one_of(st.text(max_size=5), st.integers()),
        "metadata": json_values,
        "created_at": st.one_of(st.text(max_size=30), st.integers(), st.just("2026-01-01T00:00:00Z")),
        "extra": json_values,
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.one_of(st.binary(max_size=300), records.map(lambda d: json.dumps(d).encode())))
def test_any_bytes_yield_exactly_one_item_or_dead_letter(raw: bytes) -> None:
    result = parse(raw)
    assert isinstance(result, ContentItem | DeadLetter)
    if isinstance(result, ContentItem):
        assert result.text.strip() and len(result.text.encode("utf-8")) <= SETTINGS.max_text_bytes
    else:
        # The dead letter round-trips as JSON, whatever the payload was.
        assert DeadLetter.model_validate_json(result.model_dump_json()) == result
