"""The edge of the system: raw bytes in, a valid `ContentItem` or a `DeadLetter` out.

Total by design: whatever the bytes, `parse_record` returns exactly one of the two and
never raises, so every record that enters gets one verdict or one dead letter.
"""

from __future__ import annotations

import base64
import json
import unicodedata
from typing import Any, Literal

from pydantic import ValidationError

from cascade.contract import MAX_ID_CHARS, ContentItem, DeadLetter, DeadLetterCode
from cascade.settings import Settings

_FIELDS = frozenset(ContentItem.model_fields)
_MAX_MESSAGE_CHARS = 2000

# pydantic error types → our codes; anything else is an invalid value.
_CODE_BY_PYDANTIC_TYPE = {
    "missing": DeadLetterCode.MISSING_FIELD,
    "extra_forbidden": DeadLetterCode.UNKNOWN_FIELD,
    "string_type": DeadLetterCode.WRONG_TYPE,
    "dict_type": DeadLetterCode.WRONG_TYPE,
    "datetime_type": DeadLetterCode.WRONG_TYPE,
    "datetime_parsing": DeadLetterCode.INVALID_VALUE,
    "string_too_short": DeadLetterCode.INVALID_VALUE,
    "string_too_long": DeadLetterCode.INVALID_VALUE,
}


class _Rejected(Exception):
    def __init__(self, code: DeadLetterCode, message: str, item_id: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.item_id = code, message, item_id


def parse_record(raw: bytes | str, settings: Settings, source: str | None = None) -> ContentItem | DeadLetter:
    """Validate one record (a JSONL line or a Kafka message value)."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    try:
        return _parse(data, settings)
    except _Rejected as rejected:
        return dead_letter(data, rejected.code, rejected.message, settings, source, rejected.item_id)
    except Exception as exc:  # the invariant outranks any bug below: never lose a record
        return dead_letter(data, DeadLetterCode.PROCESSING_ERROR, f"{type(exc).__name__}: {exc}", settings, source)


def dead_letter(
    data: bytes,
    code: DeadLetterCode,
    message: str,
    settings: Settings,
    source: str | None = None,
    item_id: str | None = None,
) -> DeadLetter:
    """A dead letter carrying `data`, cut (and flagged) so that the whole letter fits in one Kafka message.

    JSON escaping can double a payload (quotes) or grow it sixfold (control characters), and
    base64 adds a third, so the cut is found by measuring the serialised letter.
    """
    try:
        data.decode("utf-8")
        encoding: Literal["utf-8", "base64"] = "utf-8"
    except UnicodeDecodeError:
        encoding = "base64"
    if item_id is not None and len(item_id) > MAX_ID_CHARS:
        item_id = None
    keep = min(len(data), settings.line_limit)
    while True:
        kept = data[:keep]
        letter = DeadLetter(
            error_code=code,
            message=message[:_MAX_MESSAGE_CHARS],
            # A cut inside a UTF-8 sequence drops only that last partial character.
            payload=kept.decode("utf-8", "ignore") if encoding == "utf-8" else base64.b64encode(kept).decode("ascii"),
            payload_encoding=encoding,
            payload_truncated=keep < len(data),
            payload_bytes=len(data),
            id=item_id,
            source=source,
        )
        size = len(letter.model_dump_json().encode("utf-8"))
        if size <= settings.max_value_bytes or keep == 0:
            return letter
        keep = int(keep * settings.max_value_bytes / size * 0.98)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _parse(data: bytes, settings: Settings) -> ContentItem:
    if len(data) > settings.line_limit:
        raise _Rejected(
            DeadLetterCode.LINE_TOO_LARGE, f"record is {len(data)} bytes; the limit is {settings.line_limit}"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Rejected(DeadLetterCode.INVALID_UTF8, f"not valid UTF-8 at byte {exc.start}: {exc.reason}") from exc
    try:
        # A leading byte-order mark (Windows editors write one) is not part of the record.
        doc = json.loads(text.removeprefix("\ufeff"), parse_constant=_reject_constant)
    except RecursionError as exc:
        raise _Rejected(DeadLetterCode.MALFORMED_JSON, "JSON nested too deeply to parse") from exc
    except ValueError as exc:
        raise _Rejected(DeadLetterCode.MALFORMED_JSON, f"malformed JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise _Rejected(DeadLetterCode.NOT_AN_OBJECT, f"expected a JSON object, got {type(doc).__name__}")

    raw_id = doc.get("id")
    item_id = raw_id if isinstance(raw_id, str) and raw_id else None
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        if settings.reject_unknown_fields:
            raise _Rejected(
                DeadLetterCode.UNKNOWN_FIELD,
                f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(_FIELDS))}",
                item_id,
            )
        doc = {k: v for k, v in doc.items() if k in _FIELDS}

    _check_strings(doc, item_id)
    if "metadata" in doc and _depth(doc["metadata"]) > settings.max_metadata_depth:
        raise _Rejected(
            DeadLetterCode.INVALID_VALUE, f"metadata nested deeper than {settings.max_metadata_depth} levels", item_id
        )
    try:
        item = ContentItem.model_validate(doc, strict=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "record"
        code = _CODE_BY_PYDANTIC_TYPE.get(first["type"], DeadLetterCode.INVALID_VALUE)
        if field == "text" and first["type"] == "string_too_short":
            code = DeadLetterCode.EMPTY_TEXT
        raise _Rejected(code, f"{field}: {first['msg']}", item_id) from exc

    if not item.id.strip():
        raise _Rejected(DeadLetterCode.INVALID_VALUE, "id: must not be blank", None)
    if not _visible(item.text):
        raise _Rejected(
            DeadLetterCode.EMPTY_TEXT, "text: empty after removing whitespace and control characters", item_id
        )
    size = len(item.text.encode("utf-8"))
    if size > settings.max_text_bytes:
        raise _Rejected(
            DeadLetterCode.TEXT_TOO_LARGE,
            f"text is {size} bytes of UTF-8; the limit is {settings.max_text_bytes}",
            item_id,
        )
    return item


def _check_strings(doc: dict[str, Any], item_id: str | None) -> None:
    """Reject wrong types up front (no silent coercion of 123 to "123", or of a number to a
    timestamp) and unpaired surrogates, which are valid JSON escapes but not encodable text."""
    for name in ("id", "text", "lang", "author_id", "context", "created_at"):
        value = doc.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise _Rejected(
                DeadLetterCode.WRONG_TYPE, f"{name}: expected a string, got {type(value).__name__}", item_id
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _Rejected(
                DeadLetterCode.INVALID_TEXT,
                f"{name}: contains an unpaired surrogate (\\u escape) at {exc.start}",
                item_id,
            ) from exc
    metadata = doc.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _Rejected(
            DeadLetterCode.WRONG_TYPE, f"metadata: expected a JSON object, got {type(metadata).__name__}", item_id
        )


def _visible(text: str) -> bool:
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Zs") for ch in text)


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, iteratively (a recursive walk could itself overflow)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in node)
    return deepest
