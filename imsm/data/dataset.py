"""The dataset base: one load contract for every dataset, each module saying only what differs.

A dataset module defines a ``Dataset`` subclass (which files, the reference split, the hub copy, and how a row
becomes an ``Example``) and exposes ``load = TheDataset.load``, the ``loader._target_`` of its
``conf/dataset/<name>.yaml``. ``load`` reads one split from one source (``dataset.source``):

- ``raw``: the original files under the data directory (``files[split]``), each read by ``read_raw``.
- ``reference``: the paper authors' processed splits, ``imsm-reference/<dir>/data_{train,test}.json`` (JSON lines
  ``{"input", "output"}``): ``input`` is already the prompt, so results compare with the paper on its exact sets.
- ``hub``: ``datasets.load_dataset`` from the Hugging Face hub (online users); ``example`` maps one hub row (a plain
  dict) to an example, so the mapping is testable offline. Raw rows go through ``raw_example``, which by default is
  the same mapping (a module that reads its raw files into the hub's schema needs no other).

Every file is read by its own ``RowReader`` (``imsm.data.base``): errors name the file and row, ``on_bad_row``
applies per file, and an empty file is an error. ``load`` returns ``Examples``: a list that also says how many
malformed rows were skipped (``skipped``, summed over the split's files).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from imsm.data.base import (
    SHRINKABLE,
    DataError,
    Example,
    Examples,
    Line,
    Row,
    RowReader,
    Span,
    check_on_bad_row,
    label,
    require,
    require_str,
    string_list,
)

DATA_DIR_HELP = "Set the data directory with `data_dir=/path` or the environment variable IMSM_DATA_DIR."
SOURCES = ("raw", "reference", "hub")
REFERENCE_DIR = "imsm-reference"

Output = Callable[[Any], tuple[str, Any]]  # a reference row's ``output`` -> (target, gold)


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


def check_source(dataset: str, source: str) -> None:
    if source not in SOURCES:
        raise DataError(f"{dataset}: source={source!r} is not one of {list(SOURCES)}")


# --- the paper authors' processed splits -------------------------------------------------------------------------


def output_text(output: Any) -> tuple[str, Any]:
    """(target, gold) of a reference row whose ``output`` is the answer text."""
    text = require_str({"output": output}, "output")
    return text, text


def output_yes_no(output: Any) -> tuple[str, Any]:
    """(target, gold) of a yes/no reference row; any output but ``yes``/``no`` is an unknown label."""
    answer = label(output, {"yes": "yes", "no": "no"}, "output")
    return answer, answer


def output_aliases(output: Any) -> tuple[str, Any]:
    """(first alias, all aliases) of a reference row whose ``output`` is a list of accepted answers (WebQ)."""
    aliases = string_list([output] if isinstance(output, str) else output, "output")
    return aliases[0], aliases


def regex_span(pattern: str) -> Callable[[str], Span | None]:
    """A reference prompt's shrinkable span: group 1 of ``pattern`` (searched with DOTALL), or None if absent."""
    compiled = re.compile(pattern, re.DOTALL)

    def span(prompt: str) -> Span | None:
        found = compiled.search(prompt)
        return found.span(1) if found else None

    return span


@dataclass(frozen=True)
class Reference:
    """The authors' split files ``imsm-reference/<dir>/<files[split]>`` and how their ``output`` is read;
    ``shrinkable`` finds the passage in their prompts (``SHRINKABLE``), where a dataset marks one."""

    dir: str
    files: dict[str, str]  # our split -> file
    output: Output
    shrinkable: Callable[[str], Span | None] | None = None


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


def hub_rows(spec: HubSpec, split: str, dataset: str) -> tuple[str, Iterable[tuple[int, Row]]]:
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


# --- the base ------------------------------------------------------------------------------------------------------


class Dataset:
    """One dataset's split and template; subclasses set the class attributes and override the hooks they need.

    Hooks: ``example`` (a hub row -> Example or list), ``raw_example`` (a raw row; defaults to ``example``),
    ``read_raw`` (a raw file's rows; JSON lines by default), ``raw_paths``, ``hub_parts`` and ``group_hub_rows``
    (which hub splits make ours, and regrouping their rows).
    """

    name: ClassVar[str]
    # the raw source: our split -> its file(s) under the data directory
    files: ClassVar[dict[str, str | Sequence[str]]]
    reference: ClassVar[Reference]
    hub: ClassVar[HubSpec]
    loader_options: ClassVar[dict[str, Any]] = {}  # further ``loader:`` keys of the YAML, with their defaults

    def __init__(self, split: str, template: str, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.loader_options))
        if unknown:
            raise DataError(
                f"{self.name}: unknown loader option(s) {unknown} (conf/dataset/{self.name}.yaml, loader:); "
                f"choices: {sorted(self.loader_options)}"
            )
        self.split, self.template = split, template
        self.options = {**self.loader_options, **options}

    @classmethod
    def load(
        cls,
        data_dir: str | os.PathLike | None,
        split: str,
        template: str,
        *,
        source: str = "raw",
        on_bad_row: str = "error",
        **options: Any,
    ) -> Examples:
        """Examples of ``split`` from ``source``; ``on_bad_row`` is ``error`` or ``skip``."""
        check_source(cls.name, source)
        check_on_bad_row(on_bad_row)
        dataset = cls(split, template, **options)
        if source == "reference":
            return dataset.load_reference(data_dir, on_bad_row)
        if source == "hub":
            return dataset.load_hub(on_bad_row)
        return dataset.load_raw(data_dir, on_bad_row)

    # --- the three sources ---

    def load_raw(self, data_dir: str | os.PathLike | None, on_bad_row: str) -> Examples:
        examples = Examples()
        for path in self.raw_paths(data_dir):
            reader = RowReader(path, on_bad_row)
            examples += reader.examples(self.read_raw(reader), self.raw_example)
            examples.skipped += reader.skipped
        return examples

    def load_reference(self, data_dir: str | os.PathLike | None, on_bad_row: str) -> Examples:
        """``input`` is the prompt; ``reference.output`` reads ``output`` into (target, gold)."""
        ref = self.reference
        file = split_file(self.name, ref.files, self.split, "reference")
        path = data_path(data_dir, f"{REFERENCE_DIR}/{ref.dir}/{file}")

        def convert(numbered: tuple[int, Row]) -> Example:
            line, row = numbered  # each example keeps its line, to find it in the authors' file
            prompt = require_str(row, "input")
            target, gold = ref.output(require(row, "output"))
            meta: dict[str, Any] = {"line": line}
            span = ref.shrinkable(prompt) if ref.shrinkable else None
            if span:
                meta[SHRINKABLE] = span
            return Example(prompt=prompt, target=target, gold=gold, meta=meta)

        reader = RowReader(path, on_bad_row)
        return reader.examples(((line, (line, row)) for line, row in reader.jsonl()), convert)

    def load_hub(self, on_bad_row: str) -> Examples:
        examples = Examples()
        for part in self.hub_parts():
            where, rows = hub_rows(self.hub, part, self.name)
            reader = RowReader(where, on_bad_row)
            examples += reader.examples(self.group_hub_rows(rows, part), self.example)
            examples.skipped += reader.skipped
        return examples

    # --- hooks ---

    def example(self, row: Row) -> Example | list[Example]:
        """One row in the hub's schema -> its example(s)."""
        raise NotImplementedError

    def raw_example(self, row: Row) -> Example | list[Example]:
        """One row of ``read_raw`` -> its example(s); the hub mapping unless the raw schema differs."""
        return self.example(row)

    def read_raw(self, reader: RowReader) -> Iterable[tuple[Line, Row]]:
        """(line, row) of one raw file; each row parsed inside ``reader.at(line)``."""
        return reader.jsonl()

    def raw_paths(self, data_dir: str | os.PathLike | None) -> list[Path]:
        files = split_file(self.name, self.files, self.split)
        return [data_path(data_dir, f) for f in ([files] if isinstance(files, str) else files)]

    def hub_parts(self) -> list[str]:
        """The hub splits (our names) that make up this split."""
        return [self.split]

    def group_hub_rows(self, rows: Iterable[tuple[int, Row]], part: str) -> Iterable[tuple[Line, Row]]:
        """The rows of one hub split as ``example`` takes them (one per question unless a module regroups)."""
        return rows


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
