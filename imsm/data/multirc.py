"""MultiRC (Khashabi et al. 2018), SuperGLUE v1.1: questions on a passage, each with answer options labelled
true or false. Every example is a yes/no question on the passage (target ``yes``/``no``):

- A question that is itself a yes/no question, i.e. it has an option reading ``Yes``, ``No``, ``True`` or
  ``False`` (any case, surrounding spaces ignored) that is labelled correct, and only one of the two polarities is
  correct, is asked as written; the target is that polarity (``True`` counts as ``yes``). Its other options
  (explanations such as "No, he was rough with him") are not used.
- Every other question becomes one example per option, asked with ``option_question`` from the dataset YAML,
  ``Is it true that the answer to "{question}" is "{option}"?``; the target is ``yes`` when the option is labelled
  correct. Options with blank text (three in train) are dropped.

Splits: ``train`` (5131 questions) and ``val`` (953) from ``multirc/{train,val}.jsonl``, and ``yesno``: the yes/no
questions of train + val (312), exactly the questions of the paper's evaluation subset in ``imsm-reference/multirc``
(which are in shuffled order there; their passages separate sentences with several spaces, from the original
MultiRC release). ``yesno`` shares questions with ``train``: do not train on ``train`` and evaluate on ``yesno``.
The hub copy ``aps/super_glue`` (``multirc``) has one row per option; rows are grouped back into questions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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
    hub_rows,
    load_examples,
    read_jsonl,
    reference_output_yes_no,
    render,
    require,
    require_str,
    split_file,
    yes_no_label,
)

FILES = {
    "train": ["multirc/train.jsonl"],
    "val": ["multirc/val.jsonl"],
    "yesno": ["multirc/train.jsonl", "multirc/val.jsonl"],
}
SPEC = SourceSpec(
    "multirc",
    "multirc",
    {"yesno": "data_test.json"},
    reference_output_yes_no,
    HubSpec("aps/super_glue", "multirc", {"train": "train", "val": "validation"}),
)
DEFAULT_OPTION_QUESTION = 'Is it true that the answer to "{question}" is "{option}"?'
POLARITY = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
LABELS = {1: "yes", 0: "no"}  # True/False compare equal to 1/0


def option_label(option: dict[str, Any], where: Where, lineno: Line) -> bool:
    """Whether an option is correct; a label other than 0/1 (the hub's test split has -1) is malformed."""
    return yes_no_label(require(option, "label", where, lineno), LABELS, where, lineno, "label") == "yes"


def yes_no_answer(options: list[dict[str, Any]], where: Where = "?", lineno: Line = 0) -> str | None:
    """``yes``/``no`` if the options make this a yes/no question (see the module docstring), else None."""
    correct = {
        POLARITY[o["text"].strip().lower()]
        for o in options
        if o["text"].strip().lower() in POLARITY and option_label(o, where, lineno)
    }
    return correct.pop() if len(correct) == 1 else None


def question_examples(
    row: dict[str, Any],
    template: str,
    option_question: str,
    where: Where,
    lineno: Line,
    yes_no_only: bool = False,
) -> list[Example]:
    """One question ``{"passage", "question", "answers": [{"text", "label"}], ...}`` -> its examples."""
    passage = require_str(row, "passage", where, lineno).strip()
    question = require_str(row, "question", where, lineno).strip()
    options = require(row, "answers", where, lineno)
    if not isinstance(options, list) or not options:
        raise DataError(
            f"{where}:{lineno}: field 'answers' should be a non-empty list of options, found {options!r}"
        )
    for option in options:
        if not isinstance(require(option, "text", where, lineno), str):
            raise DataError(
                f"{where}:{lineno}: field 'text' of an option should be a string, found {option!r}"
            )
    # three train options are blank: there is nothing to ask about them
    options = [o for o in options if o["text"].strip()]
    if not options:
        raise DataError(f"{where}:{lineno}: field 'answers' has only blank options")
    # passage/question ids restart in each SuperGLUE file, so the file's split is part of the id
    meta = {"split": row.get("split"), "passage": row.get("passage_idx"), "question": row.get("question_idx")}
    answer = yes_no_answer(options, where, lineno)
    if answer is not None:
        return [
            Example(prompt=render(template, question=question, passage=passage), target=answer, meta=meta)
        ]
    if yes_no_only:
        return []
    return [
        Example(
            prompt=render(
                template,
                question=render(option_question, question=question, option=o["text"].strip()),
                passage=passage,
            ),
            target="yes" if option_label(o, where, lineno) else "no",
            meta={**meta, "option": o.get("idx", i)},
        )
        for i, o in enumerate(options)
    ]


def raw_questions(path: Path, bad: BadRows) -> Iterator[tuple[Line, dict[str, Any]]]:
    """(position, question row) for every question of a SuperGLUE MultiRC jsonl file (one passage per line)."""
    for lineno, row in read_jsonl(path, bad):
        try:
            passage = require(row, "passage", path, lineno)
            text = require_str(passage, "text", path, lineno)
            questions = require(passage, "questions", path, lineno)
        except DataError as e:
            bad.handle(e)
            continue
        for k, q in enumerate(questions):
            q = q if isinstance(q, dict) else {}
            yield (
                f"{lineno} questions[{k}]",
                {
                    "passage": text,
                    "question": q.get("question"),
                    "answers": q.get("answers"),
                    "split": path.stem,
                    "passage_idx": row.get("idx"),
                    "question_idx": q.get("idx"),
                },
            )


def hub_questions(
    rows: Iterable[tuple[Line, dict[str, Any]]], split: str = "?"
) -> Iterator[tuple[Line, dict[str, Any]]]:
    """Group consecutive ``aps/super_glue`` rows (one per option) back into questions."""
    current: dict[str, Any] | None = None
    first: Line = 0
    for n, row in rows:
        idx = row.get("idx") or {}
        key = (idx.get("paragraph"), idx.get("question"))
        if current is None or key != current["key"]:
            if current is not None:
                yield first, current
            first = n
            current = {
                "key": key,
                "passage": row.get("paragraph"),
                "question": row.get("question"),
                "answers": [],
                "split": split,
                "passage_idx": key[0],
                "question_idx": key[1],
            }
        current["answers"].append(
            {"text": row.get("answer"), "label": row.get("label"), "idx": idx.get("answer")}
        )
    if current is not None:
        yield first, current


def load(
    data_dir: str,
    split: str,
    template: str,
    *,
    option_question: str = DEFAULT_OPTION_QUESTION,
    source: str = "raw",
    on_bad_row: str = "error",
    **_: object,
) -> list[Example]:
    """Examples of ``train``, ``val`` or ``yesno`` (the paper's evaluation questions)."""
    yes_no_only = split == "yesno"

    def convert(row: dict[str, Any], where: Where, lineno: Line) -> list[Example]:
        return question_examples(row, template, option_question, where, lineno, yes_no_only)

    def examples(
        sources: list[tuple[Where, Iterable[tuple[Line, dict[str, Any]]]]], bad: BadRows
    ) -> list[Example]:
        return [ex for where, rows in sources for ex in convert_rows(rows, convert, where, bad)]

    def hub(bad: BadRows) -> list[Example]:
        # yesno gathers the yes/no questions of both splits, as the raw source does
        sources = []
        for part in ["train", "val"] if yes_no_only else [split]:
            where, rows = hub_rows(SPEC.hub, part, "multirc")
            sources.append((where, hub_questions(rows, part)))
        return examples(sources, bad)

    def raw(bad: BadRows) -> list[Example]:
        paths = [data_path(data_dir, f) for f in split_file("multirc", FILES, split)]
        return examples([(path, raw_questions(path, bad)) for path in paths], bad)

    return load_examples(SPEC, data_dir, split, template, source, on_bad_row, raw=raw, hub=hub)
