"""Language-modelling corpora (minillm's L_PT): plain text or instruction data as training examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdtool.data import Example, load_examples
from kdtool.errors import UserError
from kdtool.files import json_records, read_text


def load_lm_examples(path: str | Path) -> list[Any]:
    """An LM corpus as examples whose whole text is the target.

    ``.txt``: one document per non-empty line; JSONL/JSON with a ``text`` field: one document per
    record; anything else is read as instruction data (prompt masked, response trained).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"lm_data file not found: {path}")
    if path.suffix == ".txt":
        docs = [line for line in read_text(path).splitlines() if line.strip()]
    else:
        records = list(json_records(path))
        first = records[0][1] if records else None
        if not (isinstance(first, dict) and "text" in first):
            return load_examples(path)
        docs = []
        for where, record in records:
            if not (isinstance(record, dict) and isinstance(record.get("text"), str)):
                raise UserError(f"{where}: expected an object with a string field 'text' (as line 1)")
            docs.append(record["text"])
    if not docs:
        raise UserError(f"{path}: no documents found")
    return [Example(prompt="", response=d, index=i) for i, d in enumerate(docs)]
