"""MRPC (Dolan & Brockett 2005): are two sentences paraphrases? Target ``yes``/``no``.

Raw files are GLUE's: ``mrpc/train.tsv`` (3668) and ``mrpc/dev.tsv`` (408) with a header
``Quality, #1 ID, #2 ID, #1 String, #2 String``; the labelled test set (1725) is the original
``msr_paraphrase_test.txt`` in the same layout (GLUE's own ``test.tsv`` has no labels). ``Quality`` 1 is ``yes``.
The paper's reference split has the same rows in the same order, but its sentences are tokenised
(``PCCW 's``, ``$ 2.5``), as in the hub copy ``nyu-mll/glue`` (``mrpc``), whose test labels are hidden (-1).
"""

from __future__ import annotations

from collections.abc import Iterator

from imsm.data.base import Example, Row, RowReader, label, render, require_str
from imsm.data.dataset import Dataset, HubSpec, Reference, output_yes_no

RAW_LABELS = {"1": "yes", "0": "no"}
HUB_LABELS = {1: "yes", 0: "no"}


class MRPC(Dataset):
    """Splits ``train``, ``dev`` and ``test``."""

    name = "mrpc"
    files = {"train": "mrpc/train.tsv", "dev": "mrpc/dev.tsv", "test": "mrpc/msr_paraphrase_test.txt"}
    reference = Reference("mrpc", {"train": "data_train.json", "test": "data_test.json"}, output_yes_no)
    hub = HubSpec(
        "nyu-mll/glue",
        "mrpc",
        {"train": "train", "dev": "validation"},
        note="GLUE hides the test labels on the hub; use source=raw (msr_paraphrase_test.txt) or source=reference.",
    )

    def make_example(self, sentence1: str, sentence2: str, answer: str) -> Example:
        return Example(prompt=render(self.template, sentence1=sentence1, sentence2=sentence2), target=answer)

    def read_raw(self, reader: RowReader) -> Iterator[tuple[int, Row]]:
        return reader.tsv()  # the column names are on the header line

    def raw_example(self, row: Row) -> Example:
        """A GLUE/MSR tsv row -> Example."""
        answer = label(require_str(row, "Quality").strip(), RAW_LABELS, "Quality")
        return self.make_example(require_str(row, "#1 String"), require_str(row, "#2 String"), answer)

    def example(self, row: Row) -> Example:
        """A ``nyu-mll/glue`` mrpc row ``{sentence1, sentence2, label, idx}`` -> Example."""
        answer = label(row.get("label"), HUB_LABELS, "label")
        return self.make_example(require_str(row, "sentence1"), require_str(row, "sentence2"), answer)


load = MRPC.load
