"""What every dataset module produces, and the shared helpers to read its sources with useful errors.

A dataset module turns rows into ``Example(prompt, target, gold)``:
``prompt`` is the exact model input (the template filled in), ``target`` the training response, ``gold`` what
the metric compares against (a string, or a list of accepted aliases). Modules never tokenise.

Every dataset reads one of three sources (``dataset.source``):

- ``raw``: the original files under the data directory, parsed by the module.
- ``reference``: the paper authors' processed splits, ``imsm-reference/<dir>/data_{train,test}.json`` (JSON lines
  ``{"input", "output"}``): ``input`` is already the prompt, so results compare with the paper on its exact sets.
- ``hub``: ``datasets.load_dataset`` from the Hugging Face hub (online users); each module maps one hub row (a
  plain dict) to an example, so that mapping is testable offline.

A malformed row (bad JSON, missing field, unknown label) raises ``DataError`` naming the file, the line and the
field; with ``on_bad_row: skip`` it is skipped instead and the number skipped is logged as a warning.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DATA_DIR_HELP = "Set the data directory with `data_dir=/path` or the environment variable IMSM_DATA_DIR."
SOURCES = ("raw", "reference", "hub")
BAD_ROW_POLICIES = ("error", "skip")
REFERENCE_DIR = "imsm-reference"

Where = Path | str  # a file, or a description such as "hub:nyu-mll/glue/mrpc[train]"
Line = int | str  # a line number, or a position inside a JSON document such as "data[3].qas[1]"


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


def split_file(name: str, files: dict[str, Any], split: str, source: str = "raw") -> Any:
    """``files[split]``, or an error listing the splits this dataset has for this source."""
    if split not in files:
        raise DataError(f"{name} has no split {split!r} for source={source}; choices: {sorted(files)}")
    return files[split]


@dataclass
class BadRows:
    """What happens to a malformed row: ``error`` raises, ``skip`` counts it and goes on."""

    policy: str = "error"
    skipped: int = 0
    first: str | None = None

    def __post_init__(self) -> None:
        if self.policy not in BAD_ROW_POLICIES:
            raise DataError(f"on_bad_row={self.policy!r} is not one of {list(BAD_ROW_POLICIES)}")

    def handle(self, error: DataError) -> None:
        if self.policy == "error":
            raise error
        self.skipped += 1
        self.first = self.first or str(error)

    def report(self, where: Where) -> None:
        if self.skipped:
            log.warning(
                "%s: skipped %d malformed rows (on_bad_row=skip); first: %s", where, self.skipped, self.first
            )


def read_jsonl(path: Path, bad: BadRows | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, row) from a JSON-lines file; a bad line raises naming file and line (or is skipped)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                error = DataError(f"{path}:{lineno}: not valid JSON ({e.msg})")
                if bad is None:
                    raise error from e
                bad.handle(error)
                continue
            if not isinstance(row, dict):
                error = DataError(f"{path}:{lineno}: expected a JSON object, found {type(row).__name__}")
                if bad is None:
                    raise error
                bad.handle(error)
                continue
            yield lineno, row


def read_json(path: Path) -> Any:
    """A whole JSON document; a syntax error names the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from e


def read_tsv(
    path: Path,
    fieldnames: list[str] | None = None,
    *,
    quoting: int = csv.QUOTE_NONE,
    bad: BadRows | None = None,
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row dict) from a tab-separated file.

    ``fieldnames=None`` takes them from the header line. A UTF-8 BOM is dropped (GLUE's MRPC files start with one).
    GLUE files are read with ``QUOTE_NONE`` since their sentences contain unbalanced quotes; a row with the wrong
    number of fields is malformed.
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=quoting)
        if fieldnames is None:
            fieldnames = next(reader, None)
            if not fieldnames:
                raise DataError(f"{path}:1: the header line is missing")
        for cells in reader:
            lineno = reader.line_num
            if not cells:
                continue
            if len(cells) != len(fieldnames):
                error = DataError(
                    f"{path}:{lineno}: expected {len(fieldnames)} tab-separated fields {fieldnames}, found {len(cells)}"
                )
                if bad is None:
                    raise error
                bad.handle(error)
                continue
            yield lineno, dict(zip(fieldnames, cells, strict=True))


def require(row: dict[str, Any], key: str, path: Where, lineno: Line) -> Any:
    """``row[key]``, or an error naming the file, the line and the missing field."""
    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected an object with field {key!r}, found {type(row).__name__}")
    if key not in row or row[key] is None:
        raise DataError(f"{path}:{lineno}: missing field {key!r} (fields present: {sorted(row)})")
    return row[key]


def require_str(row: dict[str, Any], key: str, path: Where, lineno: Line) -> str:
    """A string field that must be present and not blank."""
    value = require(row, key, path, lineno)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}:{lineno}: field {key!r} should be a non-empty string, found {value!r}")
    return value


def string_list(value: Any, key: str, path: Where, lineno: Line) -> list[str]:
    """A field that must be a non-empty list of non-blank strings (answer aliases)."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise DataError(
            f"{path}:{lineno}: field {key!r} should be a non-empty list of strings, found {value!r}"
        )
    return list(value)


def yes_no_label(value: Any, labels: dict[Any, str], path: Where, lineno: Line, key: str) -> str:
    """Map a dataset's label (``1``, ``"0"``, ...) to ``"yes"``/``"no"``; an unknown label names its field."""
    if value in labels:
        return labels[value]
    raise DataError(
        f"{path}:{lineno}: unknown label {value!r} in field {key!r}; expected one of {sorted(labels)}"
    )


def nonempty(examples: list[Example], what: Where) -> list[Example]:
    if not examples:
        raise DataError(f"{what}: the split is empty")
    return examples


Convert = Callable[[dict[str, Any], Where, Line], "Example | list[Example]"]


def convert_rows(
    rows: Iterable[tuple[Line, dict[str, Any]]], convert: Convert, where: Where, bad: BadRows
) -> list[Example]:
    """Apply ``convert(row, where, lineno)`` to every row; a ``DataError`` goes to ``bad`` (raise or skip)."""
    examples: list[Example] = []
    for lineno, row in rows:
        try:
            out = convert(row, where, lineno)
        except DataError as e:
            bad.handle(e)
            continue
        examples.extend(out if isinstance(out, list) else [out])
    bad.report(where)
    return nonempty(examples, where)


# --- the paper authors' processed splits -----------------------------------------------------------------------


def reference_output_str(output: Any, path: Where, lineno: Line) -> tuple[str, Any]:
    """(target, gold) of a reference row whose ``output`` is the answer text."""
    if not isinstance(output, str) or not output.strip():
        raise DataError(f"{path}:{lineno}: field 'output' should be a non-empty string, found {output!r}")
    return output, output


def reference_output_yes_no(output: Any, path: Where, lineno: Line) -> tuple[str, Any]:
    """(target, gold) of a yes/no reference row; any output but ``yes``/``no`` is an unknown label."""
    label = yes_no_label(output, {"yes": "yes", "no": "no"}, path, lineno, "output")
    return label, label


def reference_output_aliases(output: Any, path: Where, lineno: Line) -> tuple[str, Any]:
    """(first alias, all aliases) of a reference row whose ``output`` is a list of accepted answers (WebQ)."""
    aliases = string_list([output] if isinstance(output, str) else output, "output", path, lineno)
    return aliases[0], aliases


def load_reference(
    data_dir: str | os.PathLike | None,
    dirname: str,
    files: dict[str, str],
    split: str,
    output: Callable[[Any, Where, Line], tuple[str, Any]],
    bad: BadRows,
) -> list[Example]:
    """Examples of ``imsm-reference/<dirname>/<files[split]>``: ``input`` is the prompt, ``output`` gives target/gold."""
    path = data_path(data_dir, f"{REFERENCE_DIR}/{dirname}/{split_file(dirname, files, split, 'reference')}")

    def convert(row: dict[str, Any], where: Where, lineno: Line) -> Example:
        prompt = require_str(row, "input", where, lineno)
        target, gold = output(require(row, "output", where, lineno), where, lineno)
        return Example(prompt=prompt, target=target, gold=gold, meta={"line": lineno})

    return convert_rows(read_jsonl(path, bad), convert, path, bad)


# --- the Hugging Face hub ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSpec:
    """Where a dataset lives on the hub: ``load_dataset(path, name, split=splits[our split])``."""

    path: str
    name: str | None = None
    splits: dict[str, str] = field(default_factory=dict)
    note: str = ""  # why a split is missing, shown in the error

    def where(self, split: str) -> str:
        return f"hub:{self.path}{'/' + self.name if self.name else ''}[{split}]"


def hub_rows(spec: HubSpec, split: str, dataset: str) -> tuple[str, Iterator[tuple[int, dict[str, Any]]]]:
    """(description, (row number, row) pairs) of one hub split; ``datasets`` is imported only here."""
    if split not in spec.splits:
        raise DataError(
            f"{dataset} has no split {split!r} for source=hub; choices: {sorted(spec.splits)}. {spec.note}".strip()
        )
    from datasets import load_dataset  # heavy import, needed by online users only

    hub_split = spec.splits[split]
    try:
        ds = load_dataset(spec.path, spec.name, split=hub_split)
    except Exception as e:  # network, auth, renamed repo: say which dataset and how to avoid the hub
        raise DataError(
            f"could not load {spec.where(hub_split)} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Use dataset.source=raw with the original files instead. {DATA_DIR_HELP}"
        ) from e
    return spec.where(hub_split), ((i, dict(row)) for i, row in enumerate(ds, start=1))


def load_hub(spec: HubSpec, split: str, dataset: str, convert: Convert, bad: BadRows) -> list[Example]:
    """Examples of one hub split, each row mapped by ``convert(row, where, row_number)``."""
    where, rows = hub_rows(spec, split, dataset)
    return convert_rows(rows, convert, where, bad)


def check_source(dataset: str, source: str) -> None:
    if source not in SOURCES:
        raise DataError(f"{dataset}: source={source!r} is not one of {list(SOURCES)}")


Loader = Callable[[BadRows], list[Example]]


@dataclass(frozen=True)
class SourceSpec:
    """Where one dataset's processed sources live: the authors' reference splits and the hub copy."""

    name: str
    reference_dir: str  # imsm-reference/<reference_dir>/
    reference_files: dict[str, str]  # our split -> file
    # a reference row's output -> (target, gold)
    reference_output: Callable[[Any, Where, Line], tuple[str, Any]]
    hub: HubSpec
    # a hub row -> Example: (row, template, where, line); None when the module brings its own hub loader
    hub_example: Callable[[dict[str, Any], str, Where, Line], Example] | None = None


def load_examples(
    spec: SourceSpec,
    data_dir: str | os.PathLike | None,
    split: str,
    template: str,
    source: str,
    on_bad_row: str,
    *,
    raw: Loader,
    hub: Loader | None = None,
) -> list[Example]:
    """Examples of ``split`` from ``source``: the reference split, the hub (each row through ``spec.hub_example``,
    or a module's own ``hub`` loader), or the module's ``raw`` loader; each gets the ``on_bad_row`` policy."""
    check_source(spec.name, source)
    bad = BadRows(on_bad_row)
    if source == "reference":
        return load_reference(
            data_dir, spec.reference_dir, spec.reference_files, split, spec.reference_output, bad
        )
    if source == "hub":
        if hub is not None:
            return hub(bad)
        assert spec.hub_example is not None, (
            f"{spec.name}: SourceSpec needs hub_example or load_examples(hub=)"
        )
        example = spec.hub_example
        return load_hub(spec.hub, split, spec.name, lambda r, w, n: example(r, template, w, n), bad)
    return raw(bad)


# --- the task type (LoRAMoE's localized balancing constraint) ----------------------------------------------------

TASK_TYPES = {1: "world-knowledge QA (closed-book questions)", 0: "any other task"}


def check_task_type(dataset: str, value: Any) -> int | None:
    """A dataset's ``task_type`` (``conf/dataset/<name>.yaml``): 1 world-knowledge QA, 0 other, None unset.

    LoRAMoE's balancing constraint weights one half of the experts up for world-knowledge samples and the other half
    for the rest; ``load_split`` stamps each example (``Example.meta["task_type"]``), the collator batches it.
    """
    if value is None:
        return None
    if isinstance(value, bool) or value not in TASK_TYPES:
        raise DataError(
            f"{dataset}: task_type={value!r} (conf/dataset/{dataset}.yaml) is not one of {TASK_TYPES} or null"
        )
    return int(value)
