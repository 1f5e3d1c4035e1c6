"""MRPC (Dolan & Brockett 2005): are two sentences paraphrases? Target ``yes``/``no``.

Raw files are GLUE's: ``mrpc/train.tsv`` (3668) and ``mrpc/dev.tsv`` (408) with a header
``Quality, #1 ID, #2 ID, #1 String, #2 String``; the labelled test set (1725) is the original
``msr_paraphrase_test.txt`` in the same layout (GLUE's own ``test.tsv`` has no labels). ``Quality`` 1 is ``yes``.
The paper's reference split has the same rows in the same order, but its sentences are tokenised
(``PCCW 's``, ``$ 2.5``), as in the hub copy ``nyu-mll/glue`` (``mrpc``), whose test labels are hidden (-1).
"""

from __future__ import annotations

from typing import Any

from imsm.data.base import (
    BadRows,
    Example,
    HubSpec,
    SourceSpec,
    Where,
    convert_rows,
    data_path,
    load_examples,
    read_tsv,
    reference_output_yes_no,
    render,
    require_str,
    split_file,
    yes_no_label,
)

FILES = {"train": "mrpc/train.tsv", "dev": "mrpc/dev.tsv", "test": "mrpc/msr_paraphrase_test.txt"}
RAW_LABELS = {"1": "yes", "0": "no"}
HUB_LABELS = {1: "yes", 0: "no"}


def make_example(sentence1: str, sentence2: str, label: str, template: str) -> Example:
    return Example(prompt=render(template, sentence1=sentence1, sentence2=sentence2), target=label)


def example_from_raw(row: dict[str, Any], template: str, where: Where, lineno: int) -> Example:
    """A GLUE/MSR tsv row -> Example."""
    label = yes_no_label(
        require_str(row, "Quality", where, lineno).strip(), RAW_LABELS, where, lineno, "Quality"
    )
    return make_example(
        require_str(row, "#1 String", where, lineno),
        require_str(row, "#2 String", where, lineno),
        label,
        template,
    )


def example_from_hub(row: dict[str, Any], template: str, where: Where = "hub", lineno: int = 0) -> Example:
    """A ``nyu-mll/glue`` mrpc row ``{sentence1, sentence2, label, idx}`` -> Example."""
    label = yes_no_label(row.get("label"), HUB_LABELS, where, lineno, "label")
    return make_example(
        require_str(row, "sentence1", where, lineno),
        require_str(row, "sentence2", where, lineno),
        label,
        template,
    )


SPEC = SourceSpec(
    "mrpc",
    "mrpc",
    {"train": "data_train.json", "test": "data_test.json"},
    reference_output_yes_no,
    HubSpec(
        "nyu-mll/glue",
        "mrpc",
        {"train": "train", "dev": "validation"},
        note="GLUE hides the test labels on the hub; use source=raw (msr_paraphrase_test.txt) or source=reference.",
    ),
    example_from_hub,
)


def load(
    data_dir: str, split: str, template: str, *, source: str = "raw", on_bad_row: str = "error", **_: object
) -> list[Example]:
    """Examples of ``train``, ``dev`` or ``test``."""

    def raw(bad: BadRows) -> list[Example]:
        path = data_path(data_dir, split_file("mrpc", FILES, split))
        return convert_rows(
            read_tsv(path, bad=bad), lambda r, w, n: example_from_raw(r, template, w, n), path, bad
        )

    return load_examples(SPEC, data_dir, split, template, source, on_bad_row, raw=raw)
