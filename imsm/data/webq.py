"""WebQuestions (Berant et al. 2013): open questions answered from Freebase. Gold = every accepted alias.

Raw files are SEMPRE's ``webquestions/webquestions.examples.{train,test}.json``, one JSON array of
``{"url", "targetValue", "utterance"}``; ``targetValue`` is an s-expression ``(list (description "A") (description
B) ...)`` whose descriptions are the aliases. The target is the first alias; the metric accepts any of them.
Splits: ``train`` (3778) and ``test`` (2032). The hub copy ``stanfordnlp/web_questions`` already has
``{"question", "answers": [...]}``.
"""

from __future__ import annotations

import re
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
    read_json,
    reference_output_aliases,
    render,
    require_str,
    split_file,
    string_list,
)

FILES = {
    "train": "webquestions/webquestions.examples.train.json",
    "test": "webquestions/webquestions.examples.test.json",
}
DESCRIPTION = re.compile(r"\(description\s+")


def parse_target_value(value: str, where: Where = "?", lineno: Line = 0) -> list[str]:
    """Aliases of a ``targetValue`` s-expression ``(list (description A) (description "B c") ...)``.

    Quoted aliases may hold unescaped quotes and parentheses (``"Temperance "Tempie" Fitzgerald"``,
    ``"Pinocchio Medley ("Do You See the Noses Growing?"): ..."``), so the text is cut at each ``(description``
    rather than parsed as a strict s-expression; one pair of surrounding quotes is then removed.
    """
    text = value.strip()
    starts = [m for m in DESCRIPTION.finditer(text)]
    if (
        not (text.startswith("(list") and text.endswith(")"))
        or not starts
        or text[5 : starts[0].start()].strip()
    ):
        raise DataError(
            f"{where}:{lineno}: field 'targetValue' is not a (list (description ...)) expression: {value!r}"
        )
    ends = [m.start() for m in starts[1:]] + [len(text) - 1]  # the last alias ends before the list's ")"
    aliases = []
    for m, end in zip(starts, ends, strict=True):
        chunk = text[m.end() : end].rstrip()
        if not chunk.endswith(")") or not chunk[:-1].strip():
            raise DataError(f"{where}:{lineno}: field 'targetValue' has a malformed description: {value!r}")
        alias = chunk[:-1].strip()
        if len(alias) >= 2 and alias[0] == alias[-1] == '"':
            alias = alias[1:-1]
        aliases.append(alias)
    return aliases


def make_example(question: str, aliases: list[str], template: str) -> Example:
    return Example(prompt=render(template, question=question), target=aliases[0], gold=aliases)


def example_from_raw(row: dict[str, Any], template: str, where: Where, lineno: Line) -> Example:
    aliases = parse_target_value(require_str(row, "targetValue", where, lineno), where, lineno)
    return make_example(require_str(row, "utterance", where, lineno), aliases, template)


def example_from_hub(row: dict[str, Any], template: str, where: Where = "hub", lineno: Line = 0) -> Example:
    """A ``stanfordnlp/web_questions`` row ``{url, question, answers}`` -> Example."""
    aliases = string_list(row.get("answers"), "answers", where, lineno)
    return make_example(require_str(row, "question", where, lineno), aliases, template)


SPEC = SourceSpec(
    "webq",
    "webq",
    {"test": "data_test.json"},
    reference_output_aliases,
    HubSpec("stanfordnlp/web_questions", None, {"train": "train", "test": "test"}),
    example_from_hub,
)


def load(
    data_dir: str, split: str, template: str, *, source: str = "raw", on_bad_row: str = "error", **_: object
) -> list[Example]:
    """Examples of ``train`` or ``test``."""

    def raw(bad: BadRows) -> list[Example]:
        path = data_path(data_dir, split_file("webq", FILES, split))
        doc = read_json(path)
        if not isinstance(doc, list):
            raise DataError(f"{path}: expected a JSON array of questions, found {type(doc).__name__}")
        rows = ((f"[{i}]", row) for i, row in enumerate(doc))
        return convert_rows(rows, lambda r, w, n: example_from_raw(r, template, w, n), path, bad)

    return load_examples(SPEC, data_dir, split, template, source, on_bad_row, raw=raw)
