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
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from imsm.data.base import DataError, Example, Row, RowReader, render, require_str
from imsm.data.dataset import Dataset, HubSpec, Reference, output_aliases

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


def distinct(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


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


class FreebaseQA(Dataset):
    """Splits ``eval`` and ``dev`` (``train`` only with ``source=hub``)."""

    name = "freebaseqa"
    files = {
        "dev": "freebaseqa/v1.1-prerelease/FreebaseQA-dev.tab",
        "eval": "freebaseqa/v1.1-prerelease/FreebaseQA-eval.tab",
    }
    reference = Reference("freebase", {"eval": "data_test.json"}, output_aliases)
    hub = HubSpec("KelvinJiang/freebase_qa", None, {"train": "train", "dev": "validation", "eval": "test"})

    def make_example(self, question: str, answers: list[str]) -> Example:
        return Example(prompt=render(self.template, question=question), target=answers[0], gold=answers)

    def raw_paths(self, data_dir: str | os.PathLike | None) -> list[Path]:
        if self.split == "train":
            raise DataError(
                "freebaseqa has no train split in the data directory (only the pre-release dev/eval files); "
                "use it for evaluation, or dataset.source=hub for the v1.0 train set"
            )
        return super().raw_paths(data_dir)

    def read_raw(self, reader: RowReader) -> Iterator[tuple[int, Row]]:
        """Merge the lines of each question: (first line, ``{"question", "answers"}``) in order of first appearance."""
        groups: dict[str, tuple[int, list[str]]] = {}
        # these files were written with CSV quoting, unlike GLUE's: "" inside quotes is one "
        for lineno, row in reader.tsv(COLUMNS, quoting=csv.QUOTE_MINIMAL):
            with reader.at(lineno):
                question, answer = require_str(row, "question"), require_str(row, "answer").strip()
                groups.setdefault(question, (lineno, []))[1].append(answer)
        for question, (lineno, answers) in groups.items():
            yield lineno, {"question": question, "answers": distinct(answers)}

    def raw_example(self, row: Row) -> Example:
        return self.make_example(row["question"], row["answers"])

    def example(self, row: Row) -> Example:
        """A v1.0 row ``{Question-ID, RawQuestion, ProcessedQuestion, Parses}`` -> Example (gold: every answer)."""
        answers = distinct(a.strip() for a in answer_names(row.get("Parses")) if a.strip())
        if not answers:
            raise DataError("field 'Parses' holds no AnswersName")
        return self.make_example(require_str(row, "RawQuestion"), answers)


load = FreebaseQA.load
