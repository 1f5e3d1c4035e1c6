"""FreebaseQA (Jiang et al. 2019): trivia questions answered from Freebase; evaluation only here.

Raw files are the 2017 pre-release ``freebaseqa/v1.1-prerelease/FreebaseQA-{dev,eval}.tab``: tab-separated, no
header, eight fields (subject, Freebase name, subject id, predicate, mediator predicate, answer id, answer,
question), one line per (question, parse), written with CSV quoting (``"..."`` around fields that hold quotes).
Lines of the same question are merged: the target is its first answer, gold every distinct answer. Splits:
``eval`` (4000 questions) and ``dev`` (3996); the ``.tab`` files are used rather than the ``.txt`` ones because
they are complete per question. There is no train split here (the v1.0 train file is not in the data directory):
the hub copy ``KelvinJiang/freebase_qa`` (v1.0 JSON) has one. The paper's reference split (3996 questions) is v1.0's
eval set: the same questions as ``eval`` minus four, with double quotes removed and the question mark moved to the end.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
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
    read_tsv,
    reference_output_aliases,
    render,
    require_str,
    split_file,
)

COLUMNS = [
    "subject",
    "subject_name",
    "subject_id",
    "predicate",
    "mediator",
    "answer_id",
    "answer",
    "question",
]
FILES = {
    "dev": "freebaseqa/v1.1-prerelease/FreebaseQA-dev.tab",
    "eval": "freebaseqa/v1.1-prerelease/FreebaseQA-eval.tab",
}


def make_example(question: str, answers: list[str], template: str) -> Example:
    return Example(prompt=render(template, question=question), target=answers[0], gold=answers)


def distinct(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def group_questions(
    rows: Iterable[tuple[Line, dict[str, str]]], where: Where, bad: BadRows
) -> Iterator[tuple[Line, dict[str, Any]]]:
    """Merge the lines of each question: (first line, ``{"question", "answers"}``) in order of first appearance."""
    groups: dict[str, tuple[Line, list[str]]] = {}
    for lineno, row in rows:
        try:
            question = require_str(row, "question", where, lineno)
            answer = require_str(row, "answer", where, lineno).strip()
        except DataError as e:
            bad.handle(e)
            continue
        groups.setdefault(question, (lineno, []))[1].append(answer)
    for question, (lineno, answers) in groups.items():
        yield lineno, {"question": question, "answers": distinct(answers)}


def answer_names(node: Any) -> Iterator[str]:
    """Every string under an ``AnswersName`` key, however the hub nests ``Parses`` (list of dicts or dict of lists)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "AnswersName":
                yield from strings(value)
            else:
                yield from answer_names(value)
    elif isinstance(node, list):
        for item in node:
            yield from answer_names(item)


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def example_from_hub(row: dict[str, Any], template: str, where: Where = "hub", lineno: Line = 0) -> Example:
    """A v1.0 row ``{Question-ID, RawQuestion, ProcessedQuestion, Parses}`` -> Example (gold: every answer name)."""
    answers = distinct(a.strip() for a in answer_names(row.get("Parses")) if a.strip())
    if not answers:
        raise DataError(f"{where}:{lineno}: field 'Parses' holds no AnswersName")
    return make_example(require_str(row, "RawQuestion", where, lineno), answers, template)


SPEC = SourceSpec(
    "freebaseqa",
    "freebase",
    {"eval": "data_test.json"},
    reference_output_aliases,
    HubSpec("KelvinJiang/freebase_qa", None, {"train": "train", "dev": "validation", "eval": "test"}),
    example_from_hub,
)


def load(
    data_dir: str, split: str, template: str, *, source: str = "raw", on_bad_row: str = "error", **_: object
) -> list[Example]:
    """Examples of ``eval`` or ``dev`` (``train`` only with ``source=hub``)."""

    def raw(bad: BadRows) -> list[Example]:
        if split == "train":
            raise DataError(
                "freebaseqa has no train split in the data directory (only the pre-release dev/eval files); "
                "use it for evaluation, or dataset.source=hub for the v1.0 train set"
            )
        path = data_path(data_dir, split_file("freebaseqa", FILES, split))
        # these files were written with CSV quoting, unlike GLUE's: "" inside quotes is one "
        lines = read_tsv(path, COLUMNS, quoting=csv.QUOTE_MINIMAL, bad=bad)
        groups = group_questions(lines, path, bad)
        return convert_rows(
            groups, lambda r, w, n: make_example(r["question"], r["answers"], template), path, bad
        )

    return load_examples(SPEC, data_dir, split, template, source, on_bad_row, raw=raw)
