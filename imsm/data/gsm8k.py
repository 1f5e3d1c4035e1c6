"""GSM8K (Cobbe et al. 2021) from the original ``gsm8k/{train,test}.jsonl`` files.

Rows are ``{"question", "answer"}``; the answer is a rationale with ``<<expr=value>>`` calculator annotations and a
last line ``#### N``. The training target is the rationale without annotations, ending ``The answer is N.`` (the
paper authors' processing, checked against their reference split); ``gold`` is N as a string, which must be a
number ``imsm.metrics.gsm8k_accuracy`` can score (``parse_number``): an empty or wordy final answer is malformed.
The hub copy ``openai/gsm8k`` (config ``main``) has the same fields; the reference split has only ``test``.
"""

from __future__ import annotations

import re
from typing import Any

from imsm.data.base import DataError, Example, Row, render, require_str
from imsm.data.dataset import Dataset, HubSpec, Reference
from imsm.metrics import parse_number

CALCULATOR = re.compile(r"<<[^>]*>>")
FINAL_ANSWER = re.compile(r"The answer is (.+?)\.?\s*$")


def scorable(final: str, key: str, written: str) -> str:
    """The gold number of a final answer (commas dropped), or an error if the metric cannot read it as a number."""
    gold = final.strip().replace(",", "")
    if parse_number(gold) is None:
        raise DataError(
            f"field {key!r}: the final answer {written!r} is not a number (gold {gold!r}): gsm8k_accuracy "
            "compares numbers, so no prediction could match it"
        )
    return gold


def make_target(answer: str) -> tuple[str, str]:
    """(target text, final number) from a GSM8K ``answer`` field."""
    if "####" not in answer:
        raise DataError("field 'answer' has no '#### N' final line")
    rationale, final = answer.rsplit("####", 1)
    final = final.strip()
    gold = scorable(final, "answer", f"#### {final}")
    rationale = CALCULATOR.sub("", rationale).strip()
    # The target keeps the number as written ("2,125", as the authors' split does); the gold drops the commas.
    return f"{rationale}\nThe answer is {final}.", gold


def reference_output(output: Any) -> tuple[str, Any]:
    """(target, final number) of a reference row, whose output already ends ``The answer is N.``."""
    found = FINAL_ANSWER.search(output) if isinstance(output, str) else None
    if found is None:
        raise DataError("field 'output' does not end with 'The answer is N.'")
    return output, scorable(found.group(1), "output", found.group(0).strip())


class GSM8K(Dataset):
    """Splits ``train`` and ``test``; raw and hub rows are both ``{"question", "answer"}``."""

    name = "gsm8k"
    files = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
    # the authors' train file was too large to copy: use the raw one
    reference = Reference("GSM8K", {"test": "data_test.json"}, reference_output)
    hub = HubSpec("openai/gsm8k", "main", {"train": "train", "test": "test"})

    def example(self, row: Row) -> Example:
        question = require_str(row, "question")
        target, final = make_target(require_str(row, "answer"))
        return Example(prompt=render(self.template, question=question), target=target, gold=final)


load = GSM8K.load
