"""Reading the files users hand to kdtool, with one-line ``path: reason`` errors.

Every reader here turns what would otherwise be a traceback (a latin-1 or binary file, a
truncated JSON document, a file nested too deeply for the parser, a directory where a file was
expected) into a :class:`~kdtool.errors.UserError` that names the file, and the line where the
file has lines.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdtool.errors import UserError


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, renamed over it: a reader sees
    the old file (or none) or the whole new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_text(path: str | Path) -> str:
    """The file's text, decoded as UTF-8 (a leading byte-order mark is dropped).

    Raises:
        UserError: unreadable (``path: cannot read ...``) or not UTF-8 (``path:line: not UTF-8 ...``).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "kdtool reads UTF-8 files only"
        ) from exc


def json_reason(exc: json.JSONDecodeError) -> str:
    """``not valid JSON (Expecting value at column 5)``: the message without the whole-file offset."""
    return f"not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})"


def parse_json(text: str) -> Any:
    """``json.loads``, with every failure as a ``ValueError`` that has a short message.

    Raises:
        json.JSONDecodeError: invalid JSON (``lineno``/``msg`` locate it).
        ValueError: nested too deeply for the parser.
    """
    try:
        return json.loads(text)
    except RecursionError as exc:  # e.g. "[[[[..." far deeper than any real record
        raise ValueError("JSON nested too deeply") from exc


def load_json(path: str | Path) -> Any:
    """One JSON document from ``path`` (a manifest, a summary, a JSON-array data file).

    Raises:
        UserError: unreadable, empty, not UTF-8, or not valid JSON (``path:line: reason``).
    """
    path = Path(path)
    return _document(path, read_text(path))


def _document(path: Path, text: str) -> Any:
    if not text.strip():
        raise UserError(f"{path}: empty file, expected JSON")
    try:
        return parse_json(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: {json_reason(exc)}") from exc
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from exc


def json_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` for each record of a JSONL file or a JSON array.

    Location is ``path:line`` (JSONL) or ``path:item N`` (array). A JSONL line that is not valid
    JSON comes as a ``ValueError`` in place of the record, so a caller may skip it; a broken
    array (one document) raises at once.

    Raises:
        UserError: unreadable, not UTF-8, a broken JSON array, or an array that is not a list.
    """
    path = Path(path)
    text = read_text(path)
    if text.lstrip().startswith("["):
        items = _document(path, text)
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON array of objects")
        for i, item in enumerate(items):
            yield f"{path}:item {i}", item
        return
    # Split on "\n" only: str.splitlines() would also split inside JSON strings at U+2028 & co.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", parse_json(line)
        except json.JSONDecodeError as exc:
            yield f"{path}:{lineno}", ValueError(json_reason(exc))
        except ValueError as exc:
            yield f"{path}:{lineno}", exc


def field_names(record: dict[Any, Any], limit: int = 8) -> str:
    """The record's field names for a message, at most ``limit`` of them (a record may hold thousands)."""
    names = [str(k)[:40] for k in list(record)[:limit]]
    more = len(record) - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "") or "no fields"


def file_fingerprint(path: str | Path) -> str:
    """The first 16 hex digits of the file's SHA-256 (what a logit cache records of its data)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
