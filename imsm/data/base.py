"""What every dataset produces (``Example``), its error (``DataError``), and the row reader that locates errors.

A dataset turns rows into ``Example(prompt, target, gold)``: ``prompt`` is the exact model input (the template
filled in), ``target`` the training response, ``gold`` what the metric compares against (a string, or a list of
accepted aliases). Datasets never tokenise.

Errors are located in one place. The field checks here (``require``, ``require_str``, ``string_list``, ``label``)
name the field and the valid choices but not the row; a ``RowReader`` parses each row of one file (or hub split)
inside ``reader.at(line)``, which attaches ``file:line`` to any ``DataError`` raised there and applies
``on_bad_row``: ``error`` raises, ``skip`` counts the row, goes on, and logs the count once the file is read.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

BAD_ROW_POLICIES = ("error", "skip")

Where = Path | str  # a file, or a description such as "hub:nyu-mll/glue/mrpc[train]"
Line = int | str  # a line number, or a position inside a JSON document such as "data[3].qas[1]"
Row = dict[str, Any]
T = TypeVar("T")


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
    """A data file is missing or a row is malformed; the message names the file, the row and the field.

    A field check raises it without a location; ``at`` adds the first location it is given (the innermost row).
    """

    def __init__(self, message: str, where: Where | None = None, line: Line | None = None) -> None:
        super().__init__(message)
        self.message, self.where, self.line = message, where, line

    def at(self, where: Where, line: Line | None = None) -> DataError:
        if self.where is None:
            self.where, self.line = where, line
        return self

    def __str__(self) -> str:
        if self.where is None:
            return self.message
        return f"{self.where}{'' if self.line is None else f':{self.line}'}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:  # keep the location across processes
        return type(self), (self.message, self.where, self.line)


def render(template: str, **fields: str) -> str:
    """Fill ``{name}`` placeholders for the given names only.

    Unlike ``str.format`` this leaves other braces alone: the GSM8K prompt itself contains a literal ``{answer}``.
    """
    out = template
    for name, value in fields.items():
        out = out.replace("{" + name + "}", value)
    return out


# --- field checks: they name the field and the choices; the row reader adds the file and line --------------------


def require(row: Any, key: str) -> Any:
    """``row[key]``, or an error naming the missing field and the fields present."""
    if not isinstance(row, dict):
        raise DataError(f"expected an object with field {key!r}, found {type(row).__name__}")
    if key not in row or row[key] is None:
        raise DataError(f"missing field {key!r} (fields present: {sorted(row)})")
    return row[key]


def require_str(row: Any, key: str) -> str:
    """A string field that must be present and not blank."""
    value = require(row, key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"field {key!r} should be a non-empty string, found {value!r}")
    return value


def string_list(value: Any, key: str) -> list[str]:
    """A field that must be a non-empty list of non-blank strings (answer aliases)."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(f"field {key!r} should be a non-empty list of strings, found {value!r}")
    return list(value)


def label(value: Any, labels: dict[Any, str], key: str) -> str:
    """Map a dataset's label (``1``, ``"0"``, ...) to ours (``"yes"``/``"no"``); an unknown one lists the choices."""
    if value in labels:
        return labels[value]
    raise DataError(f"unknown label {value!r} in field {key!r}; expected one of {sorted(labels)}")


# --- the row reader ------------------------------------------------------------------------------------------------


def check_on_bad_row(policy: str) -> None:
    if policy not in BAD_ROW_POLICIES:
        raise DataError(f"on_bad_row={policy!r} is not one of {list(BAD_ROW_POLICIES)}")


@contextmanager
def located(where: Where, line: Line | None = None) -> Iterator[None]:
    """Attach ``where:line`` to a ``DataError`` raised in the block, then raise it (for whole-document errors)."""
    try:
        yield
    except DataError as e:
        e.at(where, line)
        raise


@dataclass
class RowReader:
    """The rows of one source (a file, or a hub split) and what a malformed row does (``on_bad_row``)."""

    where: Where
    on_bad_row: str = "error"
    skipped: int = 0
    first: str | None = None  # the first skipped row's error, shown in the warning

    def __post_init__(self) -> None:
        check_on_bad_row(self.on_bad_row)

    @contextmanager
    def at(self, line: Line) -> Iterator[None]:
        """Parse one row: a ``DataError`` in the block gets ``where:line``; ``skip`` counts it instead of raising."""
        try:
            yield
        except DataError as e:
            e.at(self.where, line)
            if self.on_bad_row == "error":
                raise
            self.skipped += 1
            self.first = self.first or str(e)

    def examples(
        self, rows: Iterable[tuple[Line, T]], convert: Callable[[T], Example | list[Example]]
    ) -> list[Example]:
        """``convert`` every row (one example or several); an empty result is an error."""
        examples: list[Example] = []
        for line, row in rows:
            with self.at(line):
                out = convert(row)
                examples.extend(out if isinstance(out, list) else [out])
        if self.skipped:
            log.warning(
                "%s: skipped %d malformed rows (on_bad_row=skip); first: %s",
                self.where,
                self.skipped,
                self.first,
            )
        if not examples:
            raise DataError("the split is empty", self.where)
        return examples

    # Readers of the file formats: each row is parsed inside ``at`` and yielded only when it parsed.

    def jsonl(self) -> Iterator[tuple[int, Row]]:
        """(line number, object) of each non-blank line of a JSON-lines file."""
        with open(self.where, encoding="utf-8") as f:
            for lineno, text in enumerate(f, start=1):
                if text.strip():
                    with self.at(lineno):
                        yield lineno, json_object(text)

    def json(self) -> Any:
        """The whole JSON document; a syntax error names the line and column (and is never skipped)."""
        try:
            with open(self.where, encoding="utf-8") as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg}, column {e.colno})", self.where, e.lineno) from e

    def tsv(
        self, fieldnames: list[str] | None = None, quoting: int = csv.QUOTE_NONE
    ) -> Iterator[tuple[int, Row]]:
        """(line number, row dict) of a tab-separated file; ``fieldnames=None`` reads them from the header line.

        A UTF-8 BOM is dropped (GLUE's MRPC files start with one). GLUE files are read with ``QUOTE_NONE`` since
        their sentences contain unbalanced quotes; a row with the wrong number of fields is malformed.
        """
        with open(self.where, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=quoting)
            names = fieldnames or next(reader, None)
            if not names:
                raise DataError("the header line is missing", self.where, 1)
            for cells in reader:
                if cells:
                    with self.at(reader.line_num):
                        yield reader.line_num, fields(names, cells)


def json_object(text: str) -> Row:
    """One JSON-lines row, which must be an object."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg})") from e
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, found {type(row).__name__}")
    return row


def fields(names: list[str], cells: list[str]) -> Row:
    """A tab-separated row as a dict; the number of cells must match the columns."""
    if len(cells) != len(names):
        raise DataError(f"expected {len(names)} tab-separated fields {names}, found {len(cells)}")
    return dict(zip(names, cells, strict=True))
