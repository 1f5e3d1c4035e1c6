"""ROPES (Lin et al. 2019): read a background passage and a situation, answer a question about them.

Raw files are SQuAD-style ``ropes/{train,dev}-v1.0.json``: ``data[].paragraphs[]`` with ``background``,
``situation`` and ``qas[]`` (``question``, ``id``, ``answers[].text``). Each question is one example; the target
is the first answer text without surrounding spaces. Splits: ``train`` (10924 questions) and ``dev`` (1688, the
paper's evaluation set). Line breaks inside a background or situation become spaces, as in the paper's prompts,
so the template's own line breaks are the only ones. Raw questions are flattened into the hub schema of
``allenai/ropes`` (``background, situation, question, answers: {text: [...]}``) and share its row mapping.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    read_json,
    reference_output_str,
    render,
    require,
    require_str,
    split_file,
    string_list,
)

FILES = {"train": "ropes/train-v1.0.json", "dev": "ropes/dev-v1.0.json"}


def flat(text: str) -> str:
    return text.replace("\r\n", " ").replace("\n", " ")


def answer_texts(row: dict[str, Any], where: Where, lineno: Line) -> list[str]:
    """The answers of a row in the hub schema ``{"text": [...]}``, stripped; an empty list is malformed."""
    answers = require(row, "answers", where, lineno)
    if not isinstance(answers, dict):
        raise DataError(f"{where}:{lineno}: field 'answers' should be {{'text': [...]}}, found {answers!r}")
    texts = string_list(answers.get("text"), "answers.text", where, lineno)
    return [t.strip() for t in texts]


def example_from_hub(row: dict[str, Any], template: str, where: Where = "hub", lineno: Line = 0) -> Example:
    """One question in the ``allenai/ropes`` schema -> Example."""
    prompt = render(
        template,
        background=flat(require_str(row, "background", where, lineno)),
        situation=flat(require_str(row, "situation", where, lineno)),
        question=require_str(row, "question", where, lineno),
    )
    texts = answer_texts(row, where, lineno)
    return Example(
        prompt=prompt,
        target=texts[0],
        gold=texts[0] if len(texts) == 1 else texts,
        meta={"id": row.get("id")},
    )


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None


def raw_rows(doc: Any, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(position, question row in the hub schema) for every question of a SQuAD-style document.

    Missing fields are left as None here, so the row mapping reports them (and ``on_bad_row`` applies).
    """
    data = require(doc, "data", path, "top level")
    for i, article in enumerate(data):
        for j, para in enumerate(require(article, "paragraphs", path, f"data[{i}]")):
            for k, qa in enumerate(require(para, "qas", path, f"data[{i}].paragraphs[{j}]")):
                answers = _get(qa, "answers")
                texts = [_get(a, "text") for a in answers] if isinstance(answers, list) else None
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


# the authors' train file was too large to copy: use the raw one
SPEC = SourceSpec(
    "ropes",
    "ropes",
    {"dev": "data_test.json"},
    reference_output_str,
    HubSpec("allenai/ropes", None, {"train": "train", "dev": "validation"}),
    example_from_hub,
)


def load(
    data_dir: str, split: str, template: str, *, source: str = "raw", on_bad_row: str = "error", **_: object
) -> list[Example]:
    """Examples of ``train`` or ``dev``."""

    def convert(row: dict[str, Any], where: Where, lineno: Line) -> Example:
        return example_from_hub(row, template, where, lineno)

    def raw(bad: BadRows) -> list[Example]:
        path = data_path(data_dir, split_file("ropes", FILES, split))
        return convert_rows(raw_rows(read_json(path), path), convert, path, bad)

    return load_examples(SPEC, data_dir, split, template, source, on_bad_row, raw=raw)
