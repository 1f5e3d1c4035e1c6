"""GSM8K (Cobbe et al. 2021) from the original ``gsm8k/{train,test}.jsonl`` files.

Rows are ``{"question", "answer"}``; the answer is a rationale with ``<<expr=value>>`` calculator annotations and a
last line ``#### N``. The training target is the rationale without annotations, ending ``The answer is N.`` (the
paper authors' processing, checked against their reference split); ``gold`` is N as a string.
"""

from __future__ import annotations

import re
from pathlib import Path

from imsm.data.base import DataError, Example, data_path, nonempty, read_jsonl, render, require

CALCULATOR = re.compile(r"<<[^>]*>>")
FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}


def make_target(answer: str, path: Path | str = "?", lineno: int = 0) -> tuple[str, str]:
    """(target text, final number) from a GSM8K ``answer`` field."""
    if "####" not in answer:
        raise DataError(f"{path}:{lineno}: field 'answer' has no '#### N' final line")
    rationale, final = answer.rsplit("####", 1)
    final = final.strip()
    rationale = CALCULATOR.sub("", rationale).strip()
    # The target keeps the number as written ("2,125", as the authors' split does); the gold drops the commas.
    return f"{rationale}\nThe answer is {final}.", final.replace(",", "")


def load(data_dir: str, split: str, template: str, **_: object) -> list[Example]:
    """Examples of one split (``train`` or ``test``)."""
    if split not in FILES:
        raise DataError(f"gsm8k has no split {split!r}; choices: {sorted(FILES)}")
    path = data_path(data_dir, FILES[split])
    examples = []
    for lineno, row in read_jsonl(path):
        question = require(row, "question", path, lineno)
        target, final = make_target(require(row, "answer", path, lineno), path, lineno)
        examples.append(Example(prompt=render(template, question=question), target=target, gold=final))
    return nonempty(examples, f"{path}")
