"""What every dataset module produces, and the shared helpers to read raw files with useful errors.

A dataset module turns raw files into ``Example(prompt, target, gold)``:
``prompt`` is the exact model input (the template filled in), ``target`` the training response, ``gold`` what
the metric compares against (a string, or a list of accepted aliases). Modules never tokenise.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DATA_DIR_HELP = "Set the data directory with `data_dir=/path` or the environment variable IMSM_DATA_DIR."


@dataclass
class Example:
    """One prompt/response pair. ``gold`` defaults to ``target``."""

    prompt: str
    target: str
    gold: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gold is None:
            self.gold = self.target


class DataError(ValueError):
    """A data file is missing or a row is malformed; the message names the file, the row and the field."""


def render(template: str, **fields: str) -> str:
    """Fill ``{name}`` placeholders for the given names only.

    Unlike ``str.format`` this leaves other braces alone: the GSM8K prompt itself contains a literal ``{answer}``.
    """
    out = template
    for name, value in fields.items():
        out = out.replace("{" + name + "}", value)
    return out


def data_path(data_dir: str | os.PathLike | None, relative: str) -> Path:
    """``data_dir / relative``, or an error naming the missing path and how to set the directory."""
    if not data_dir:
        raise DataError(f"No data directory is set. {DATA_DIR_HELP}")
    path = Path(data_dir).expanduser() / relative
    if not path.exists():
        raise DataError(f"Data file not found: {path}. {DATA_DIR_HELP}")
    return path


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, row) from a JSON-lines file; a bad line raises naming file and line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e


def require(row: dict[str, Any], key: str, path: Path, lineno: int) -> Any:
    """``row[key]``, or an error naming the file, the line and the missing field."""
    if key not in row or row[key] is None:
        raise DataError(f"{path}:{lineno}: missing field {key!r} (fields present: {sorted(row)})")
    return row[key]


def nonempty(examples: list[Example], what: str) -> list[Example]:
    if not examples:
        raise DataError(f"{what}: the split is empty")
    return examples
