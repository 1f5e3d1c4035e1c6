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

The template asks the question before the passage, so the passage is marked as the part an over-long prompt loses
(``SHRINKABLE``, its tail first): cutting the prompt's start would cut the question.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from imsm.data.base import (
    DataError,
    Example,
    Line,
    Row,
    RowReader,
    kind,
    label,
    render,
    render_marked,
    require,
    require_list,
    require_str,
)
from imsm.data.dataset import Dataset, HubSpec, Reference, output_yes_no, regex_span

DEFAULT_OPTION_QUESTION = 'Is it true that the answer to "{question}" is "{option}"?'
POLARITY = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
LABELS = {1: "yes", 0: "no"}  # True/False compare equal to 1/0


def option_label(option: Row) -> bool:
    """Whether an option is correct; a label other than 0/1 (the hub's test split has -1) is malformed."""
    return label(require(option, "label"), LABELS, "label") == "yes"


def yes_no_answer(options: list[Row]) -> str | None:
    """``yes``/``no`` if the options make this a yes/no question (see the module docstring), else None."""
    correct = {
        POLARITY[o["text"].strip().lower()]
        for o in options
        if o["text"].strip().lower() in POLARITY and option_label(o)
    }
    return correct.pop() if len(correct) == 1 else None


def hub_questions(rows: Iterable[tuple[Line, Row]], split: str = "?") -> Iterator[tuple[Line, Row]]:
    """Group consecutive ``aps/super_glue`` rows (one per option) back into questions."""
    current: Row | None = None
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


class MultiRC(Dataset):
    """Splits ``train``, ``val`` and ``yesno`` (the paper's evaluation questions)."""

    name = "multirc"
    files = {
        "train": ["multirc/train.jsonl"],
        "val": ["multirc/val.jsonl"],
        "yesno": ["multirc/train.jsonl", "multirc/val.jsonl"],
    }
    # the authors' prompts: "...\nQuestion: {question} \nContent: {passage} \nAnswer:"
    reference = Reference(
        "multirc", {"yesno": "data_test.json"}, output_yes_no, regex_span(r"\nContent: (.+) \nAnswer:\s*$")
    )
    hub = HubSpec("aps/super_glue", "multirc", {"train": "train", "val": "validation"})
    loader_options = {"option_question": DEFAULT_OPTION_QUESTION}

    def example(self, row: Row) -> list[Example]:
        """One question ``{"passage", "question", "answers": [{"text", "label"}], ...}`` -> its examples."""
        passage = require_str(row, "passage").strip()
        question = require_str(row, "question").strip()
        options = require(row, "answers")
        if not isinstance(options, list) or not options:
            raise DataError(f"field 'answers' should be a non-empty list of options, found {options!r}")
        for option in options:
            if not isinstance(require(option, "text"), str):
                raise DataError(f"field 'text' of an option should be a string, found {option!r}")
        # three train options are blank: there is nothing to ask about them
        options = [o for o in options if o["text"].strip()]
        if not options:
            raise DataError("field 'answers' has only blank options")
        # passage/question ids restart in each SuperGLUE file, so the file's split is part of the id
        meta = {
            "split": row.get("split"),
            "passage": row.get("passage_idx"),
            "question": row.get("question_idx"),
        }
        answer = yes_no_answer(options)
        if answer is not None:
            prompt, span = render_marked(self.template, "passage", question=question, passage=passage)
            return [Example(prompt=prompt, target=answer, meta={**meta, **span})]
        if self.split == "yesno":
            return []
        examples = []
        for i, o in enumerate(options):
            asked = render(self.options["option_question"], question=question, option=o["text"].strip())
            prompt, span = render_marked(self.template, "passage", question=asked, passage=passage)
            target = "yes" if option_label(o) else "no"
            examples.append(Example(prompt, target, meta={**meta, "option": o.get("idx", i), **span}))
        return examples

    def read_raw(self, reader: RowReader) -> Iterator[tuple[Line, Row]]:
        """(position, question row) for every question of a SuperGLUE MultiRC jsonl file (one passage per line)."""
        for lineno, row in reader.jsonl():
            with reader.at(lineno):  # a malformed passage skips its line
                passage = require(row, "passage")
                text, questions = require_str(passage, "text"), require_list(passage, "questions")
                for k, q in enumerate(questions):
                    if not isinstance(q, dict):
                        with reader.at(f"{lineno} questions[{k}]"):  # a malformed question skips itself only
                            raise DataError(f"a question should be an object, found {kind(q)}")
                        continue
                    yield (
                        f"{lineno} questions[{k}]",
                        {
                            "passage": text,
                            "question": q.get("question"),
                            "answers": q.get("answers"),
                            "split": Path(reader.where).stem,
                            "passage_idx": row.get("idx"),
                            "question_idx": q.get("idx"),
                        },
                    )

    def hub_parts(self) -> list[str]:
        # yesno gathers the yes/no questions of both splits, as the raw source does
        return ["train", "val"] if self.split == "yesno" else [self.split]

    def group_hub_rows(self, rows: Iterable[tuple[int, Row]], part: str) -> Iterator[tuple[Line, Row]]:
        return hub_questions(rows, part)


load = MultiRC.load
