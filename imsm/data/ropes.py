"""ROPES (Lin et al. 2019): read a background passage and a situation, answer a question about them.

Raw files are SQuAD-style ``ropes/{train,dev}-v1.0.json``: ``data[].paragraphs[]`` with ``background``,
``situation`` and ``qas[]`` (``question``, ``id``, ``answers[].text``). Each question is one example; the target
is the first answer text without surrounding spaces. Splits: ``train`` (10924 questions) and ``dev`` (1688, the
paper's evaluation set). Line breaks inside a background or situation become spaces, as in the paper's prompts,
so the template's own line breaks are the only ones. Raw questions are flattened into the hub schema of
``allenai/ropes`` (``background, situation, question, answers: {text: [...]}``) and share its row mapping.

The background is marked as the part an over-long prompt loses first (``SHRINKABLE``, its tail first), so the
instruction, the situation and the question survive whatever the template's order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from imsm.data.base import (
    DataError,
    Example,
    Row,
    RowReader,
    located,
    render_marked,
    require,
    require_list,
    require_str,
    string_list,
)
from imsm.data.dataset import Dataset, HubSpec, Reference, output_text


def flat(text: str) -> str:
    return text.replace("\r\n", " ").replace("\n", " ")


def answer_texts(row: Row) -> list[str]:
    """The answers of a row in the hub schema ``{"text": [...]}``, stripped; an empty list is malformed."""
    answers = require(row, "answers")
    if not isinstance(answers, dict):
        raise DataError(f"field 'answers' should be {{'text': [...]}}, found {answers!r}")
    return [t.strip() for t in string_list(answers.get("text"), "answers.text")]


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None


class ROPES(Dataset):
    """Splits ``train`` and ``dev``."""

    name = "ropes"
    files = {"train": "ropes/train-v1.0.json", "dev": "ropes/dev-v1.0.json"}
    # the authors' train file was too large to copy: use the raw one
    reference = Reference("ropes", {"dev": "data_test.json"}, output_text)
    hub = HubSpec("allenai/ropes", None, {"train": "train", "dev": "validation"})

    def example(self, row: Row) -> Example:
        """One question in the ``allenai/ropes`` schema -> Example."""
        prompt, span = render_marked(
            self.template,
            "background",
            background=flat(require_str(row, "background")),
            situation=flat(require_str(row, "situation")),
            question=require_str(row, "question"),
        )
        texts = answer_texts(row)
        return Example(
            prompt=prompt,
            target=texts[0],
            gold=texts[0] if len(texts) == 1 else texts,
            meta={"id": row.get("id"), **span},
        )

    def read_raw(self, reader: RowReader) -> Iterator[tuple[str, Row]]:
        """(position, question row in the hub schema) for every question of a SQuAD-style document.

        A document without ``data``/``paragraphs``/``qas`` is malformed as a whole; a question's missing fields are
        left as None here, so ``example`` reports them (and ``on_bad_row`` applies).
        """
        doc = reader.json()
        with located(reader.where, "top level"):
            data = require_list(doc, "data")
        for i, article in enumerate(data):
            with located(reader.where, f"data[{i}]"):
                paragraphs = require_list(article, "paragraphs")
            for j, para in enumerate(paragraphs):
                with located(reader.where, f"data[{i}].paragraphs[{j}]"):
                    qas = require_list(para, "qas")
                for k, qa in enumerate(qas):
                    answers = _get(qa, "answers")
                    # not a list: passed on as it is, so ``answer_texts`` names what it found
                    texts = [_get(a, "text") for a in answers] if isinstance(answers, list) else answers
                    yield (
                        f"data[{i}].paragraphs[{j}].qas[{k}]",
                        {
                            "id": _get(qa, "id"),
                            "background": _get(para, "background"),
                            "situation": _get(para, "situation"),
                            "question": _get(qa, "question"),
                            "answers": None if texts is None else {"text": texts},
                        },
                    )


load = ROPES.load
