"""CoLA (Warstadt et al. 2019): is a sentence grammatically acceptable? Target ``yes``/``no``.

Raw files are ``cola/raw/*.tsv`` from the public release, four columns without a header: source, label (1 =
acceptable = ``yes``), the original annotation, sentence. Splits: ``train`` (in_domain_train, 8551) and ``dev``, the
GLUE dev set = in_domain_dev + out_of_domain_dev (1043; CoLA's test labels are not public); each dev half is also a
split of its own. The reference split and the hub copy ``nyu-mll/glue`` (``cola``) come from GLUE's copy of CoLA,
which differs from this public release in a few sentences and one label (listed in tests/test_data.py).
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

COLUMNS = ["source", "label", "original_label", "sentence"]
FILES = {
    "train": ["cola/raw/in_domain_train.tsv"],
    "dev": ["cola/raw/in_domain_dev.tsv", "cola/raw/out_of_domain_dev.tsv"],
    "in_domain_dev": ["cola/raw/in_domain_dev.tsv"],
    "out_of_domain_dev": ["cola/raw/out_of_domain_dev.tsv"],
}
RAW_LABELS = {"1": "yes", "0": "no"}
HUB_LABELS = {1: "yes", 0: "no"}


def make_example(sentence: str, label: str, template: str) -> Example:
    return Example(prompt=render(template, sentence=sentence), target=label)


def example_from_raw(row: dict[str, Any], template: str, where: Where, lineno: int) -> Example:
    label = yes_no_label(require_str(row, "label", where, lineno).strip(), RAW_LABELS, where, lineno, "label")
    return make_example(require_str(row, "sentence", where, lineno), label, template)


def example_from_hub(row: dict[str, Any], template: str, where: Where = "hub", lineno: int = 0) -> Example:
    """A ``nyu-mll/glue`` cola row ``{sentence, label, idx}`` -> Example."""
    label = yes_no_label(row.get("label"), HUB_LABELS, where, lineno, "label")
    return make_example(require_str(row, "sentence", where, lineno), label, template)


SPEC = SourceSpec(
    "cola",
    "cola",
    {"train": "data_train.json", "dev": "data_test.json"},
    reference_output_yes_no,
    HubSpec(
        "nyu-mll/glue",
        "cola",
        {"train": "train", "dev": "validation"},
        note="GLUE hides the test labels; the paper evaluates on the GLUE dev set (split 'dev').",
    ),
    example_from_hub,
)


def load(
    data_dir: str, split: str, template: str, *, source: str = "raw", on_bad_row: str = "error", **_: object
) -> list[Example]:
    """Examples of ``train``, ``dev`` (= GLUE dev), ``in_domain_dev`` or ``out_of_domain_dev``."""

    def raw(_: BadRows) -> list[Example]:
        examples: list[Example] = []
        for path in [data_path(data_dir, f) for f in split_file("cola", FILES, split)]:
            bad = BadRows(on_bad_row)  # one count per file, so the warning names the right file
            examples += convert_rows(
                read_tsv(path, COLUMNS, bad=bad),
                lambda r, w, n: example_from_raw(r, template, w, n),
                path,
                bad,
            )
        return examples

    return load_examples(SPEC, data_dir, split, template, source, on_bad_row, raw=raw)
