"""WebQuestions (Berant et al. 2013): open questions answered from Freebase. Gold = every accepted alias.

Raw files are SEMPRE's ``webquestions/webquestions.examples.{train,test}.json``, one JSON array of
``{"url", "targetValue", "utterance"}``; ``targetValue`` is an s-expression ``(list (description "A") (description
B) ...)`` whose descriptions are the aliases. The target is the first alias; the metric accepts any of them.
Splits: ``train`` (3778) and ``test`` (2032). The hub copy ``stanfordnlp/web_questions`` already has
``{"question", "answers": [...]}``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from imsm.data.base import DataError, Example, Row, RowReader, render, require_str, string_list
from imsm.data.dataset import Dataset, HubSpec, Reference, output_aliases

DESCRIPTION = re.compile(r"\(description\s+")


def parse_target_value(value: str) -> list[str]:
    """Aliases of a ``targetValue`` s-expression ``(list (description A) (description "B c") ...)``.

    Quoted aliases may hold unescaped quotes and parentheses (``"Temperance "Tempie" Fitzgerald"``,
    ``"Pinocchio Medley ("Do You See the Noses Growing?"): ..."``), so the text is cut at each ``(description``
    rather than parsed as a strict s-expression; one pair of surrounding quotes is then removed.
    """
    text = value.strip()
    starts = list(DESCRIPTION.finditer(text))
    if (
        not (text.startswith("(list") and text.endswith(")"))
        or not starts
        or text[5 : starts[0].start()].strip()
    ):
        raise DataError(f"field 'targetValue' is not a (list (description ...)) expression: {value!r}")
    ends = [m.start() for m in starts[1:]] + [len(text) - 1]  # the last alias ends before the list's ")"
    aliases = []
    for m, end in zip(starts, ends, strict=True):
        chunk = text[m.end() : end].rstrip()
        if not chunk.endswith(")") or not chunk[:-1].strip():
            raise DataError(f"field 'targetValue' has a malformed description: {value!r}")
        alias = chunk[:-1].strip()
        if len(alias) >= 2 and alias[0] == alias[-1] == '"':
            alias = alias[1:-1]
        if not alias.strip():  # (description "") would be an empty gold answer, which no metric can match
            raise DataError(f"field 'targetValue' has an empty description: {value!r}")
        aliases.append(alias)
    return aliases


class WebQuestions(Dataset):
    """Splits ``train`` and ``test``."""

    name = "webq"
    files = {
        "train": "webquestions/webquestions.examples.train.json",
        "test": "webquestions/webquestions.examples.test.json",
    }
    reference = Reference("webq", {"test": "data_test.json"}, output_aliases)
    hub = HubSpec("stanfordnlp/web_questions", None, {"train": "train", "test": "test"})

    def make_example(self, question: str, aliases: list[str]) -> Example:
        return Example(prompt=render(self.template, question=question), target=aliases[0], gold=aliases)

    def read_raw(self, reader: RowReader) -> Iterator[tuple[str, Row]]:
        doc = reader.json()
        if not isinstance(doc, list):
            raise DataError(f"expected a JSON array of questions, found {type(doc).__name__}", reader.where)
        yield from ((f"[{i}]", row) for i, row in enumerate(doc))

    def raw_example(self, row: Row) -> Example:
        aliases = parse_target_value(require_str(row, "targetValue"))
        return self.make_example(require_str(row, "utterance"), aliases)

    def example(self, row: Row) -> Example:
        """A ``stanfordnlp/web_questions`` row ``{url, question, answers}`` -> Example."""
        aliases = string_list(row.get("answers"), "answers")
        return self.make_example(require_str(row, "question"), aliases)


load = WebQuestions.load
