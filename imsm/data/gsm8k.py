"""GSM8K (Cobbe et al. 2021) from the original ``gsm8k/{train,test}.jsonl`` files.

Rows are ``{"question", "answer"}``; the answer is a rationale with ``<<expr=value>>`` calculator annotations and a
last line ``#### N``. The training target is the rationale without annotations, ending ``The answer is N.`` (the
paper authors' processing, checked against their reference split); ``gold`` is N as a string.
The hub copy ``openai/gsm8k`` (config ``main``) has the same fields; the reference split has only ``test``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from imsm.data.base import (
    BadRows,
    DataError,
    Example,
    HubSpec,
    Line,
    SourceSpec,
    Where,
    convert_rows,
    data_path,
    load_examples,
    read_jsonl,
    render,
    require,
    split_file,
)

CALCULATOR = re.compile(r"<<[^>]*>>")
FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
FINAL_ANSWER = re.compile(r"The answer is (.+?)\.?\s*$")


def make_target(answer: str, path: Path | str = "?", lineno: int = 0) -> tuple[str, str]:
    """(target text, final number) from a GSM8K ``answer`` field."""
    if "####" not in answer:
        raise DataError(f"{path}:{lineno}: field 'answer' has no '#### N' final line")
    rationale, final = answer.rsplit("####", 1)
    final = final.strip()
    rationale = CALCULATOR.sub("", rationale).strip()
    # The target keeps the number as written ("2,125", as the authors' split does); the gold drops the commas.
    return f"{rationale}\nThe answer is {final}.", final.replace(",", "")


def example_from_row(row: dict[str, Any], template: str, where: Where = "?", lineno: Line = 0) -> Example:
    """One raw or hub row ``{"question", "answer"}`` -> Example."""
    question = require(row, "question", where, lineno)
    target, final = make_target(require(row, "answer", where, lineno), where, lineno)
    return Example(prompt=render(template, question=question), target=target, gold=final)


def reference_output(output: Any, where: Where, lineno: Line) -> tuple[str, Any]:
    """(target, final number) of a reference row, whose output already ends ``The answer is N.``."""
    found = FINAL_ANSWER.search(output) if isinstance(output, str) else None
    if found is None:
        raise DataError(f"{where}:{lineno}: field 'output' does not end with 'The answer is N.'")
    return output, found.group(1).strip().replace(",", "")


# the authors' train file was too large to copy: use the raw one
SPEC = SourceSpec(
    "gsm8k",
    "GSM8K",
    {"test": "data_test.json"},
    reference_output,
    HubSpec("openai/gsm8k", "main", {"train": "train", "test": "test"}),
    example_from_row,
)


def load(
    data_dir: str, split: str, template: str, *, source: str = "raw", on_bad_row: str = "error", **_: object
) -> list[Example]:
    """Examples of one split (``train`` or ``test``)."""

    def convert(row: dict[str, Any], where: Where, lineno: Line) -> Example:
        return example_from_row(row, template, where, lineno)

    def raw(bad: BadRows) -> list[Example]:
        path = data_path(data_dir, split_file("gsm8k", FILES, split))
        return convert_rows(read_jsonl(path, bad), convert, path, bad)

    return load_examples(SPEC, data_dir, split, template, source, on_bad_row, raw=raw)
