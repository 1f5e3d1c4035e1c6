"""CoLA (Warstadt et al. 2019): is a sentence grammatically acceptable? Target ``yes``/``no``.

Raw files are ``cola/raw/*.tsv`` from the public release, four columns without a header: source, label (1 =
acceptable = ``yes``), the original annotation, sentence. Splits: ``train`` (in_domain_train, 8551) and ``dev``, the
GLUE dev set = in_domain_dev + out_of_domain_dev (1043; CoLA's test labels are not public); each dev half is also a
split of its own. The reference split and the hub copy ``nyu-mll/glue`` (``cola``) come from GLUE's copy of CoLA,
which differs from this public release in a few sentences and one label (listed in tests/test_data.py).
"""

from __future__ import annotations

from collections.abc import Iterator

from imsm.data.base import Example, Row, RowReader, label, render, require_str
from imsm.data.dataset import Dataset, HubSpec, Reference, output_yes_no

COLUMNS = ["source", "label", "original_label", "sentence"]
RAW_LABELS = {"1": "yes", "0": "no"}
HUB_LABELS = {1: "yes", 0: "no"}


class CoLA(Dataset):
    """Splits ``train``, ``dev`` (= GLUE dev), ``in_domain_dev`` and ``out_of_domain_dev``."""

    name = "cola"
    files = {
        "train": ["cola/raw/in_domain_train.tsv"],
        "dev": ["cola/raw/in_domain_dev.tsv", "cola/raw/out_of_domain_dev.tsv"],
        "in_domain_dev": ["cola/raw/in_domain_dev.tsv"],
        "out_of_domain_dev": ["cola/raw/out_of_domain_dev.tsv"],
    }
    reference = Reference("cola", {"train": "data_train.json", "dev": "data_test.json"}, output_yes_no)
    hub = HubSpec(
        "nyu-mll/glue",
        "cola",
        {"train": "train", "dev": "validation"},
        note="GLUE hides the test labels; the paper evaluates on the GLUE dev set (split 'dev').",
    )

    def make_example(self, sentence: str, answer: str) -> Example:
        return Example(prompt=render(self.template, sentence=sentence), target=answer)

    def read_raw(self, reader: RowReader) -> Iterator[tuple[int, Row]]:
        return reader.tsv(COLUMNS)

    def raw_example(self, row: Row) -> Example:
        answer = label(require_str(row, "label").strip(), RAW_LABELS, "label")
        return self.make_example(require_str(row, "sentence"), answer)

    def example(self, row: Row) -> Example:
        """A ``nyu-mll/glue`` cola row ``{sentence, label, idx}`` -> Example."""
        answer = label(row.get("label"), HUB_LABELS, "label")
        return self.make_example(require_str(row, "sentence"), answer)


load = CoLA.load
