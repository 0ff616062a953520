"""Reading the benchmarks' published annotation files: JSON with errors that name the file and the record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["field", "load_json"]


def load_json(path: Path, what: str) -> Any:
    """The parsed content of the JSON file ``path``, ``what`` naming it in errors ("ScienceQA file").

    Raises FileNotFoundError naming ``what`` and the path, ValueError naming the path when it is not JSON.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON file ({err})") from None


def field(record: object, name: str, kind: type, where: str) -> Any:
    """``record[name]``, which must be a ``kind`` (a bool is not an int); ValueError naming ``where`` (the
    file and the record) when the record is not an object, lacks the field, or holds another type."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise ValueError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    return value
