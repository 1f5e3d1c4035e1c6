"""What every dataset produces (``Example``), its error (``DataError``), and the row reader that locates errors.

A dataset turns rows into ``Example(prompt, target, gold)``: ``prompt`` is the exact model input (the template
filled in), ``target`` the training response, ``gold`` what the metric compares against (a string, or a list of
accepted aliases). Datasets never tokenise.

Errors are located in one place. The field checks here (``require``, ``require_str``, ``string_list``, ``label``)
name the field and the valid choices but not the row; a ``RowReader`` parses each row of one file (or hub split)
inside ``reader.at(line)``, which attaches ``file:line`` to any ``DataError`` raised there and applies
``on_bad_row``: ``error`` raises (saying how to skip instead), ``skip`` counts the row, goes on, and logs the count
once the file is read; the examples it returns (``Examples``, a list) carry that count as ``skipped``.

Files are read so that nothing is loaded silently wrong: a byte that is not UTF-8 is an error at its line (a whole
JSON document: at its line and column, never skipped), and each line of a tab-separated file is parsed on its own,
so an unclosed quote is an error at its own line instead of swallowing the lines after it.

A dataset may mark the part of a prompt that truncation cuts first (``SHRINKABLE`` in ``Example.meta``, set by
``render_marked``): the passage of a reading-comprehension template, so that an over-long prompt loses the passage's
tail and never its question, wherever the template puts it (``imsm.data.collate.fit_prompt``).
"""

from __future__ import annotations

import csv
import json
import logging
import re
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
Span = tuple[int, int]  # (start, end) characters of a prompt
T = TypeVar("T")

SHRINKABLE = "shrinkable"  # Example.meta key: the prompt's Span that truncation cuts first (its tail first)
# what a row's error tells the user to do (the training set's key, then the evaluation sets')
SKIP_HINT = "; fix or remove the row, or skip malformed rows with on_bad_row=skip (dataset.on_bad_row, eval.on_bad_row)"
# a file opened with errors="surrogateescape" holds each byte that is not UTF-8 as one of these code points
BAD_BYTE = re.compile("[\udc80-\udcff]")


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
        self.skippable = False  # raised from one row (on_bad_row=skip would have skipped it)

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


class Examples(list[Example]):
    """A split's examples (a plain list) and ``skipped``: the malformed rows left out reading it (on_bad_row=skip)."""

    def __init__(self, examples: Iterable[Example] = (), skipped: int = 0) -> None:
        super().__init__(examples)
        self.skipped = skipped


def render(template: str, **fields: str) -> str:
    """Fill ``{name}`` placeholders for the given names only.

    Unlike ``str.format`` this leaves other braces alone: the GSM8K prompt itself contains a literal ``{answer}``.
    """
    out = template
    for name, value in fields.items():
        out = out.replace("{" + name + "}", value)
    return out


def render_marked(template: str, span: str, **fields: str) -> tuple[str, dict[str, Any]]:
    """``render(template, **fields)`` and the meta ``{SHRINKABLE: (start, end)}`` of field ``span`` in the prompt.

    The meta is empty when the template lacks the field or the prompt cannot be split exactly (a value that holds a
    placeholder): that prompt is then truncated the ordinary way.
    """
    prompt = render(template, **fields)
    marker = "{" + span + "}"
    if marker not in template:
        return prompt, {}
    start = len(render(template.split(marker, 1)[0], **fields))
    end = start + len(fields[span])
    return prompt, ({SHRINKABLE: (start, end)} if prompt[start:end] == fields[span] else {})


def kind(value: Any, width: int = 80) -> str:
    """A value's type and (shortened) repr for an error message: ``list ['a', 'b']``."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= width else text[: width - 3] + '...'}"


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
        raise DataError(f"field {key!r} should be a non-empty string, found {kind(value)}")
    return value


def require_list(row: Any, key: str) -> list[Any]:
    """A field that must be a list (possibly empty)."""
    value = require(row, key)
    if not isinstance(value, list):
        raise DataError(f"field {key!r} should be a list, found {kind(value)}")
    return value


def string_list(value: Any, key: str) -> list[str]:
    """A field that must be a non-empty list of non-blank strings (answer aliases)."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(f"field {key!r} should be a non-empty list of strings, found {value!r}")
    return list(value)


def label(value: Any, labels: dict[Any, str], key: str) -> str:
    """Map a dataset's label (``1``, ``"0"``, ...) to ours (``"yes"``/``"no"``); an unknown one lists the choices."""
    try:
        if value in labels:
            return labels[value]
    except TypeError:  # an unhashable value (a list, an object) is no label either
        pass
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
                e.skippable = True
                raise
            self.skipped += 1
            self.first = self.first or str(e)

    def examples(
        self, rows: Iterable[tuple[Line, T]], convert: Callable[[T], Example | list[Example]]
    ) -> Examples:
        """``convert`` every row (one example or several); an empty result is an error. A row's error says how to
        skip such rows."""
        examples = Examples()
        try:
            for line, row in rows:
                with self.at(line):
                    out = convert(row)
                    examples.extend(out if isinstance(out, list) else [out])
        except DataError as e:
            if e.skippable and not e.message.endswith(SKIP_HINT):
                e.message += SKIP_HINT
            raise
        examples.skipped = self.skipped
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
        """(line number, object) of each non-blank line of a JSON-lines file; a bad byte is that line's error."""
        with open(self.where, encoding="utf-8", errors="surrogateescape") as f:
            for lineno, text in enumerate(f, start=1):
                if text.strip():
                    with self.at(lineno):
                        check_utf8(text)
                        yield lineno, json_object(text)

    def json(self) -> Any:
        """The whole JSON document; a bad byte or a syntax error names the line and column (and is never skipped)."""
        data = Path(self.where).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line_start = data.rfind(b"\n", 0, e.start) + 1
            raise DataError(
                f"not valid UTF-8: byte 0x{data[e.start]:02X} at byte {e.start - line_start + 1} of the line "
                f"(byte offset {e.start} of the file); re-encode the file as UTF-8 (a JSON document is read "
                "whole, so on_bad_row=skip cannot skip it)",
                self.where,
                data.count(b"\n", 0, e.start) + 1,
            ) from e
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg}, column {e.colno})", self.where, e.lineno) from e

    def tsv(
        self, fieldnames: list[str] | None = None, quoting: int = csv.QUOTE_NONE
    ) -> Iterator[tuple[int, Row]]:
        """(line number, row dict) of a tab-separated file; ``fieldnames=None`` reads them from the header line.

        A UTF-8 BOM is dropped (GLUE's MRPC files start with one). GLUE files are read with ``QUOTE_NONE`` since
        their sentences contain unbalanced quotes; a row with the wrong number of fields is malformed. Every line is
        one row, parsed on its own (``tsv_cells``): no field may span lines.
        """
        with open(self.where, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            lines = enumerate(f, start=1)
            names = fieldnames
            if names is None:
                _, header = next(lines, (1, ""))
                with located(self.where, 1):
                    names = tsv_cells(header, quoting)
                if not names:
                    raise DataError("the header line is missing", self.where, 1)
            for lineno, text in lines:
                if text.strip("\r\n"):
                    with self.at(lineno):
                        yield lineno, fields(names, tsv_cells(text, quoting, names))


def check_utf8(line: str, names: list[str] | None = None) -> None:
    """A line read with ``errors="surrogateescape"`` must hold no byte that is not UTF-8; the error names the first
    one, its byte position and (with ``names``, for tab-separated lines) its field."""
    bad = BAD_BYTE.search(line)
    if bad is None:
        return
    head = line[: bad.start()]
    column = head.count("\t")
    field_name = f" in field {names[column]!r}" if names and column < len(names) else ""
    raise DataError(
        f"not valid UTF-8: byte 0x{ord(bad.group()) - 0xDC00:02X} at byte "
        f"{len(head.encode('utf-8', 'surrogateescape')) + 1} of the line{field_name}; re-encode the file as UTF-8"
    )


def tsv_cells(line: str, quoting: int, names: list[str] | None = None) -> list[str]:
    """The tab-separated cells of one line (with its line ending).

    The line is parsed alone, followed by an empty line: a quoted field still open at the end of the line would run
    into that next line, which ``csv`` would otherwise take from the file (every line until the next quote).
    """
    check_utf8(line, names)
    reader = csv.reader([line, "\n"], delimiter="\t", quoting=quoting)
    try:
        cells = next(reader, [])
    except csv.Error as e:
        raise DataError(f"not a valid tab-separated line ({e})") from e
    if reader.line_num > 1:
        column = len(next(csv.reader([line], delimiter="\t", quoting=quoting))) - 1
        field_name = f" {names[column]!r}" if names and column < len(names) else ""
        raise DataError(
            f"unbalanced double quote: field{field_name} (column {column + 1}) starts a quoted value that is not "
            'closed on this line; close it with " (a quote inside a quoted value is written "") or remove the quote'
        )
    return cells


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
