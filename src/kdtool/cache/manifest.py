"""A cache's ``manifest.json``: its format name, the atomic write, and a read checked enough that
nothing after it can fail on a malformed field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdtool.errors import UserError
from kdtool.files import load_json, replace_text

FORMAT = "kdtool-teacher-cache/1"
MANIFEST = "manifest.json"
# The fields a reader relies on, and their JSON types.
MANIFEST_FIELDS: dict[str, type] = {"format": str, "vocab_size": int, "k": int, "value_dtype": str}
TYPE_NAMES = {str: "a string", int: "an integer"}


def write_manifest(root: Path, payload: dict[str, Any]) -> None:
    """Replace ``root/manifest.json`` atomically (a reader sees the old one or the new one)."""
    replace_text(root / MANIFEST, json.dumps(payload, indent=2) + "\n")


def read_manifest(path: Path) -> dict[str, Any]:
    """A cache's ``manifest.json``, checked enough that reading the cache cannot fail on it.

    Raises:
        UserError: unreadable, not JSON, or a field missing or of the wrong type (``path: reason``).
    """
    manifest = load_json(path)
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:  # another format: the caller says so; nothing else to check
        return manifest
    for key, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise UserError(f"{path}: field {key!r} is missing or not {TYPE_NAMES[kind]}")
    if manifest.get("complete"):
        shards = manifest.get("shards")
        if not isinstance(shards, list) or not all(_is_shard_entry(s) for s in shards):
            raise UserError(f"{path}: field 'shards' must be a list of {{'file': name, ...}} in the cache")
    return manifest


def _is_shard_entry(entry: Any) -> bool:
    # a plain file name: a manifest must not point the reader outside its own directory
    name = entry.get("file") if isinstance(entry, dict) else None
    return isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")
