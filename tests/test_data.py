"""Datasets: row counts of the real files, raw prompts against the paper's reference prompts, hub row mappings,
the source switch, the dataset base, and errors on bad input (file, line and field named; ``on_bad_row: skip``
counts)."""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import pytest
from hydra.utils import get_method
from omegaconf import DictConfig

from imsm.data import (
    DataError,
    cola,
    dataset_config,
    dataset_names,
    freebaseqa,
    gsm8k,
    load_split,
    mrpc,
    multirc,
    parse_split,
    ropes,
    webq,
)
from imsm.data.base import RowReader, located, require
from imsm.data.dataset import Dataset

DATASETS = ["cola", "freebaseqa", "gsm8k", "mrpc", "multirc", "ropes", "webq"]


def config(name: str, **overrides: object) -> DictConfig:
    cfg = dataset_config(name)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def load(name: str, data_dir: Path | str, split: str, **overrides: object):
    return load_split(config(name, **overrides), str(data_dir), split)


def questions(examples) -> set:
    """MultiRC examples -> distinct (file, passage, question) ids."""
    return {(e.meta["split"], e.meta["passage"], e.meta["question"]) for e in examples}


# --- configs -------------------------------------------------------------------------------------------------


def test_every_dataset_has_a_config_with_the_shared_keys():
    assert dataset_names() == DATASETS
    for name in DATASETS:
        cfg = dataset_config(name)
        assert cfg.name == name and cfg.source == "raw" and cfg.on_bad_row == "error"
        assert {"loader", "eval_split", "metric", "max_new_tokens", "template"} <= set(cfg)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(DataError, match=r"unknown dataset 'sst2'.*'mrpc'"):
        dataset_config("sst2")


# The prompts of the issue, written out by hand (\n = newline): the YAML templates must render exactly these.
EXPECTED_PROMPTS = {
    "mrpc": (
        {"sentence1": "A b.", "sentence2": "C d."},
        "Determine if the following two sentences are semantically equivalent and output yes or no.\n"
        "Sentence1: A b.\nSentence2: C d.\nOuput:",
    ),
    "cola": (
        {"sentence": "S."},
        " Given a sentence, judge the grammatical acceptability of the sentence with yes or no.\nSentence:S.\nOutput:",
    ),
    "ropes": (
        {"background": "B.", "situation": "S.", "question": "Q?"},
        "Given an article and a corresponding question about the article, answer the question accurately based on "
        "the provided context in the articles.\nArticle: B. S.\nQuestion:Q? \nAnswer:",
    ),
    "webq": (
        {"question": "q?"},
        "Please provide a concise answer to the following question using one or a few words.\nQuestion: q?\nAnswer:",
    ),
    "freebaseqa": (
        {"question": "q?"},
        "Please provide a concise answer to the following question using one or a few words.\nQuestion:q?\nAnswer:",
    ),
    "multirc": (
        {"question": "q?", "passage": "P."},
        "Please answer the question according to the contents just with yes or no.\nQuestion: q? \nContent: P. \n"
        "Answer:",
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PROMPTS))
def test_templates_live_in_the_yaml_and_render_the_paper_prompt(name):
    fields, expected = EXPECTED_PROMPTS[name]
    prompt = dataset_config(name).template
    for key, value in fields.items():
        prompt = prompt.replace("{" + key + "}", value)
    assert prompt == expected


# --- the real data directory ------------------------------------------------------------------------------------

ROW_COUNTS = [  # SOURCES.md
    ("gsm8k", "train", 7473),
    ("gsm8k", "test", 1319),
    ("mrpc", "train", 3668),
    ("mrpc", "dev", 408),
    ("mrpc", "test", 1725),
    ("cola", "train", 8551),
    ("cola", "in_domain_dev", 527),
    ("cola", "out_of_domain_dev", 516),
    ("cola", "dev", 1043),
    ("ropes", "train", 10924),
    ("ropes", "dev", 1688),
    ("webq", "train", 3778),
    ("webq", "test", 2032),
    ("freebaseqa", "dev", 3996),
    ("freebaseqa", "eval", 4000),
]


@pytest.mark.parametrize(("name", "split", "rows"), ROW_COUNTS)
def test_raw_split_row_counts(data_dir, name, split, rows):
    examples = load(name, data_dir, split)
    assert len(examples) == rows
    assert all(e.prompt and e.target for e in examples)
    if name in ("mrpc", "cola"):
        assert {e.target for e in examples} == {"yes", "no"}


def test_multirc_question_counts(data_dir):
    train, val, yesno = (load("multirc", data_dir, s) for s in ("train", "val", "yesno"))
    # SuperGLUE v1.1 questions; each non-yes/no question became one example per (non-blank) option
    assert (len(questions(train)), len(questions(val))) == (5131, 953)
    assert (len(train), len(val)) == (26607, 4710)
    assert len(yesno) == len(questions(yesno)) == 312
    assert {e.target for e in yesno} == {"yes", "no"}


@pytest.mark.parametrize(
    ("name", "split", "rows"),
    [
        ("gsm8k", "test", 1319),
        ("mrpc", "train", 3668),
        ("mrpc", "test", 1725),
        ("cola", "train", 8551),
        ("cola", "dev", 1043),
        ("ropes", "dev", 1688),
        ("webq", "test", 2032),
        ("freebaseqa", "eval", 3996),
        ("multirc", "yesno", 312),
    ],
)
def test_reference_split_row_counts(data_dir, name, split, rows):
    examples = load(name, data_dir, split, source="reference")
    assert len(examples) == rows


def raw_and_reference(name: str, data_dir: Path, split: str):
    return load(name, data_dir, split), load(name, data_dir, split, source="reference")


def no_space(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_gsm8k_reference_source_gives_the_same_examples(data_dir):
    raw, ref = raw_and_reference("gsm8k", data_dir, "test")
    assert [(e.prompt, e.target, e.gold) for e in raw] == [(e.prompt, e.target, e.gold) for e in ref]


@pytest.mark.parametrize("split", ["train", "test"])
def test_mrpc_raw_matches_reference_up_to_tokenisation(data_dir, split):
    """Same rows, order and labels. Difference in the source text: the reference's sentences are tokenised
    (``PCCW 's``, ``$ 2.5``, ``" the witness "``), so prompts are compared without whitespace; and one train
    sentence of GLUE's file holds a control character (``Treasury\\x12s``) that the reference dropped."""
    raw, ref = raw_and_reference("mrpc", data_dir, split)
    assert [e.target for e in raw] == [e.target for e in ref]
    differ = [
        i for i, (a, b) in enumerate(zip(raw, ref, strict=True)) if no_space(a.prompt) != no_space(b.prompt)
    ]
    if split == "train":
        assert differ == [1585]
        assert no_space(raw[1585].prompt.replace("\x12", "")) == no_space(ref[1585].prompt)
    else:
        assert differ == []


# GLUE's copy of CoLA (the reference, and the hub) differs from the public cola_public release in these rows:
COLA_SOURCE_DIFFERENCES = {
    "train": {6997: "[NP and PP]"},  # GLUE keeps a bracketed note inside the sentence
    "dev": {
        18: "could not] have",
        73: "been. made was giver",
        329: "1 gave Mary",
        522: "label",  # "I would like to could swim": no in cola_public, yes in GLUE
        526: "label",  # "... became a muscle bound.": no in cola_public, yes in GLUE
        728: "book's, author",
        729: "boy's, mother,",
        730: "book's, author",
        731: "boy's, mother,",
    },
}


@pytest.mark.parametrize("split", ["train", "dev"])
def test_cola_raw_matches_reference_except_glue_edits(data_dir, split):
    raw, ref = raw_and_reference("cola", data_dir, split)
    differ = {
        i: ("label" if a.target != b.target else b.prompt)
        for i, (a, b) in enumerate(zip(raw, ref, strict=True))
        if a.prompt != b.prompt or a.target != b.target
    }
    assert sorted(differ) == sorted(COLA_SOURCE_DIFFERENCES[split])
    for i, note in COLA_SOURCE_DIFFERENCES[split].items():
        assert note in differ[i]


def test_ropes_raw_matches_reference_exactly(data_dir):
    """Prompts identical (line breaks in the text are spaces in both); one reference answer has a stray leading
    space (row 420, ``' Alkali soil'``) that the raw loader strips."""
    raw, ref = raw_and_reference("ropes", data_dir, "dev")
    assert [e.prompt for e in raw] == [e.prompt for e in ref]
    assert [e.target for e in raw] == [e.target.strip() for e in ref]
    assert [i for i, (a, b) in enumerate(zip(raw, ref, strict=True)) if a.target != b.target] == [420]


def test_webq_raw_matches_reference(data_dir):
    """Prompts identical. Aliases identical except five rows whose aliases hold quotes or parentheses, which the
    authors' parsing left quoted or cut at the first ``)``; the raw loader keeps the whole alias, unquoted."""
    raw, ref = raw_and_reference("webq", data_dir, "test")
    assert [e.prompt for e in raw] == [e.prompt for e in ref]
    differ = [i for i, (a, b) in enumerate(zip(raw, ref, strict=True)) if a.gold != b.gold]
    assert differ == [491, 781, 941, 978, 1100]
    assert 'Temperance "Tempie" Fitzgerald' in raw[941].gold
    assert raw[491].gold[1].startswith('Pinocchio Medley ("Do You See the Noses Growing?"): Desolation Theme')


def freebase_question(prompt: str) -> str:
    return prompt.split("\nQuestion:", 1)[1].rsplit("\nAnswer:", 1)[0]


def test_freebaseqa_raw_matches_reference_up_to_release_edits(data_dir):
    """The reference is FreebaseQA v1.0's eval set: the pre-release eval questions minus four, in the same order,
    with every double quote and question mark removed and one question mark put at the end; its answer is the
    first answer in lower case. Prompts are otherwise identical."""
    raw = load("freebaseqa", data_dir, "eval")
    ref = load("freebaseqa", data_dir, "eval", source="reference")

    def v1(question: str) -> str:
        return question.replace('"', "").replace("?", "") + "?"

    kinds = {"identical": 0, "quotes removed": 0, "question mark moved": 0}
    dropped, j = [], 0
    for r in ref:
        question = freebase_question(r.prompt)
        while v1(freebase_question(raw[j].prompt)) != question:
            dropped.append(j)
            j += 1
        e, j = raw[j], j + 1
        assert e.prompt.replace(freebase_question(e.prompt), question) == r.prompt
        assert r.target in [a.lower() for a in e.gold]
        raw_question = freebase_question(e.prompt)
        if raw_question == question:
            kinds["identical"] += 1
        elif raw_question.replace('"', "") == question:
            kinds["quotes removed"] += 1
        else:
            kinds["question mark moved"] += 1
    assert dropped + list(range(j, len(raw))) == [769, 2015, 2925, 3370]
    assert kinds == {"identical": 3333, "quotes removed": 367, "question mark moved": 296}


def test_multirc_yesno_split_is_the_reference_subset(data_dir):
    """The same 312 questions with the same answers (in shuffled order there). Difference in the source text: the
    reference passages (original MultiRC release) separate sentences with several spaces where SuperGLUE has one,
    so prompts are compared with runs of whitespace collapsed."""
    raw = load("multirc", data_dir, "yesno")
    ref = load("multirc", data_dir, "yesno", source="reference")

    def collapse(text: str) -> str:
        return re.sub(r" +", " ", text)

    by_prompt = {collapse(e.prompt): e for e in raw}
    assert len(by_prompt) == 312
    exact = 0
    for r in ref:
        e = by_prompt[collapse(r.prompt)]
        assert e.target == r.target
        exact += e.prompt == r.prompt
    assert exact == 0  # every reference passage has the wider sentence spacing


# --- hub rows (mapped offline; the hub itself is not reachable here) ---------------------------------------------


def dataset(module, split: str = "train") -> Dataset:
    """The module's dataset with the template of its YAML (its ``load`` is the class's)."""
    cls = module.load.__self__
    cfg = dataset_config(cls.name)
    return cls(split, cfg.template, **{k: v for k, v in cfg.loader.items() if k != "_target_"})


def test_hub_rows_map_to_the_same_examples_as_raw_rows():
    gsm = dataset(gsm8k).example({"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"})
    assert (gsm.target, gsm.gold) == ("1+1=2\nThe answer is 2.", "2")

    hub = dataset(mrpc).example({"sentence1": "A .", "sentence2": "B .", "label": 1, "idx": 0})
    raw = dataset(mrpc).raw_example(
        {"Quality": "1", "#1 ID": "1", "#2 ID": "2", "#1 String": "A .", "#2 String": "B ."}
    )
    assert (hub.prompt, hub.target) == (raw.prompt, raw.target) and hub.target == "yes"

    hub = dataset(cola).example({"sentence": "Him left.", "label": 0, "idx": 3})
    assert hub.target == "no" and hub.prompt.endswith("Sentence:Him left.\nOutput:")

    row = {
        "id": "1",
        "background": "B\nx.",
        "situation": "S. ",
        "question": "Q?",
        "answers": {"text": [" cup B "]},
    }
    hub = dataset(ropes).example(row)
    assert hub.target == hub.gold == "cup B"
    assert "Article: B x. S. \nQuestion:Q? \nAnswer:" in hub.prompt

    hub = dataset(webq).example({"url": "u", "question": "who?", "answers": ["A", "B"]})
    assert (hub.target, hub.gold) == ("A", ["A", "B"])

    row = {
        "Question-ID": "FreebaseQA-eval-0",
        "RawQuestion": "Who wrote Hamlet?",
        "ProcessedQuestion": "who wrote hamlet",
        "Parses": {  # datasets' Sequence of dicts: a dict of lists
            "Parse-Id": ["p0", "p1"],
            "Answers": [
                {"AnswersMid": ["m.1"], "AnswersName": [["shakespeare", "william shakespeare"]]},
                {"AnswersMid": ["m.1"], "AnswersName": [["shakespeare"]]},
            ],
        },
    }
    hub = dataset(freebaseqa).example(row)
    assert (hub.target, hub.gold) == ("shakespeare", ["shakespeare", "william shakespeare"])
    assert hub.prompt.endswith("Question:Who wrote Hamlet?\nAnswer:")


def multirc_hub_rows(labels_yes_no=(1, 0), labels_other=(0, 1)):
    """Two questions in the one-row-per-option schema of aps/super_glue."""
    rows = []
    for a, (text, label) in enumerate([("Yes", labels_yes_no[0]), ("No", labels_yes_no[1]), ("Because", 1)]):
        rows.append(
            {
                "paragraph": "P. ",
                "question": "Is it?",
                "answer": text,
                "label": label,
                "idx": {"paragraph": 0, "question": 0, "answer": a},
            }
        )
    for a, (text, label) in enumerate(zip(["Red", "Blue"], labels_other, strict=True), start=3):
        rows.append(
            {
                "paragraph": "P. ",
                "question": "Which colour?",
                "answer": text,
                "label": label,
                "idx": {"paragraph": 0, "question": 1, "answer": a},
            }
        )
    return rows


def test_multirc_hub_rows_are_grouped_back_into_questions():
    cfg = dataset_config("multirc")
    grouped = list(multirc.hub_questions(enumerate(multirc_hub_rows(), start=1), "train"))
    assert [n for n, _ in grouped] == [1, 4]
    examples = [e for _, q in grouped for e in dataset(multirc).example(q)]
    assert [e.target for e in examples] == ["yes", "no", "yes"]
    assert examples[0].prompt == cfg.template.replace("{question}", "Is it?").replace("{passage}", "P.")
    assert (
        'Question: Is it true that the answer to "Which colour?" is "Blue"? \nContent: P. \nAnswer:'
        in examples[2].prompt
    )


def test_multirc_yes_no_questions_follow_the_labels():
    def answer(*options):
        return multirc.yes_no_answer([{"text": t, "label": lab} for t, lab in options])

    assert answer(("Yes", 1), ("No", 0)) == "yes"
    assert answer(("no", 1), ("Because", 1)) == "no"
    assert answer(("False", 1), ("True", 0)) == "no"
    assert answer(("No.", 1)) is None  # only a bare Yes/No/True/False option makes a yes/no question
    assert answer(("Yes", 0), ("Other", 1)) is None  # no correct polarity: asked option by option
    assert answer(("Yes", 1), ("No", 1)) is None  # contradictory labels: asked option by option


def test_load_hub_maps_our_split_names(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return multirc_hub_rows()

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    examples = load_split(config("multirc", source="hub"), None, "val")
    assert calls == [("aps/super_glue", "multirc", "validation")]
    assert [e.target for e in examples] == ["yes", "no", "yes"]
    yesno = load_split(config("multirc", source="hub"), None, "yesno")
    assert calls[1:] == [("aps/super_glue", "multirc", "train"), ("aps/super_glue", "multirc", "validation")]
    assert len(yesno) == 2

    def glue_rows(path, name=None, split=None):
        calls.append((path, name, split))
        return [{"sentence1": "a", "sentence2": "b", "label": -1, "idx": 0}]

    monkeypatch.setattr("datasets.load_dataset", glue_rows)
    with pytest.raises(DataError, match="no split 'test' for source=hub.*GLUE hides"):
        load_split(config("mrpc", source="hub"), None, "test")
    with pytest.raises(
        DataError, match=r"hub:nyu-mll/glue/mrpc\[validation\]:1: unknown label -1 in field 'label'"
    ):
        load_split(config("mrpc", source="hub"), None, "dev")


def test_hub_failure_says_how_to_work_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(DataError, match="could not load hub:stanfordnlp/web_questions.*source=raw"):
        load_split(config("webq", source="hub"), None, "test")


# --- WebQ targetValue --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "aliases"),
    [
        ('(list (description "Jamaican English") (description Lawyer))', ["Jamaican English", "Lawyer"]),
        ('(list (description "Temperance "Tempie" Fitzgerald"))', ['Temperance "Tempie" Fitzgerald']),
        (
            '(list (description "Medley ("Noses?"): Theme") (description X))',
            ['Medley ("Noses?"): Theme', "X"],
        ),
        ('(list (description ""A quote.""))', ['"A quote."']),
    ],
)
def test_webq_target_value_aliases(value, aliases):
    assert webq.parse_target_value(value) == aliases


@pytest.mark.parametrize(
    "value", ["(list)", "(description x)", "(list (description ))", "(list x (description a))"]
)
def test_webq_bad_target_value(value):
    with pytest.raises(DataError, match="field 'targetValue'"):
        webq.parse_target_value(value)


# --- bad input -----------------------------------------------------------------------------------------------------


def write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


GSM_ROW = json.dumps({"question": "q", "answer": "r\n#### 1"})
MRPC_HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
ROPES_NO_QUESTION = {"background": "b", "situation": "s", "qas": [{"id": "1", "answers": [{"text": "a"}]}]}
MULTIRC_LABEL_2 = {"idx": 0, "question": "Q?", "answers": [{"text": "A", "idx": 0, "label": 2}]}


@pytest.mark.parametrize(
    ("name", "relative", "text", "split", "message"),
    [
        ("gsm8k", "gsm8k/train.jsonl", f"{GSM_ROW}\n{{not json\n", "train", r"train.jsonl:2: not valid JSON"),
        (
            "gsm8k",
            "gsm8k/train.jsonl",
            f'{GSM_ROW}\n{{"question": "q"}}\n',
            "train",
            r"train.jsonl:2: missing field 'answer'",
        ),
        (
            "mrpc",
            "mrpc/train.tsv",
            MRPC_HEADER + "1\t1\t2\ta\tb\n2\t3\t4\tc\td\n",
            "train",
            r"train.tsv:3: unknown label '2' in field 'Quality'",
        ),
        (
            "mrpc",
            "mrpc/train.tsv",
            MRPC_HEADER + "1\t1\t2\ta\n",
            "train",
            r"train.tsv:2: expected 5 tab-separated fields",
        ),
        (
            "cola",
            "cola/raw/in_domain_train.tsv",
            "s\t1\t\tok.\ns\tx\t\tbad.\n",
            "train",
            r"in_domain_train.tsv:2: unknown label 'x' in field 'label'",
        ),
        (
            "webq",
            "webquestions/webquestions.examples.train.json",
            '[{"url": "u", "targetValue": "(list (description a))"}]',
            "train",
            r"train.json:\[0\]: missing field 'utterance'",
        ),
        (
            "ropes",
            "ropes/train-v1.0.json",
            json.dumps({"data": [{"paragraphs": [ROPES_NO_QUESTION]}]}),
            "train",
            r"train-v1.0.json:data\[0\].paragraphs\[0\].qas\[0\]: missing field 'question'",
        ),
        (
            "freebaseqa",
            "freebaseqa/v1.1-prerelease/FreebaseQA-eval.tab",
            "s\tn\tm\tp\tnull\tm2\t\tWho?\n",
            "eval",
            r"FreebaseQA-eval.tab:1: field 'answer' should be a non-empty string",
        ),
        (
            "multirc",
            "multirc/val.jsonl",
            json.dumps({"idx": 0, "passage": {"text": "P.", "questions": [MULTIRC_LABEL_2]}}) + "\n",
            "val",
            r"val.jsonl:1 questions\[0\]: unknown label 2 in field 'label'",
        ),
    ],
)
def test_malformed_rows_name_file_line_and_field(tmp_path, name, relative, text, split, message):
    write(tmp_path, relative, text)
    with pytest.raises(DataError, match=message):
        load(name, tmp_path, split)


def test_reference_rows_are_checked_too(tmp_path):
    write(
        tmp_path,
        "imsm-reference/mrpc/data_test.json",
        '{"input": "p", "output": "yes"}\n{"input": "p", "output": "maybe"}\n',
    )
    with pytest.raises(DataError, match=r"data_test.json:2: unknown label 'maybe' in field 'output'"):
        load("mrpc", tmp_path, "test", source="reference")
    write(tmp_path, "imsm-reference/webq/data_test.json", '{"output": ["a"]}\n')
    with pytest.raises(DataError, match=r"data_test.json:1: missing field 'input'"):
        load("webq", tmp_path, "test", source="reference")


def test_on_bad_row_skip_counts_and_warns(tmp_path, caplog):
    write(tmp_path, "gsm8k/train.jsonl", f'{GSM_ROW}\n{{oops\n{{"question": "q"}}\n{GSM_ROW}\n')
    with caplog.at_level(logging.WARNING, logger="imsm.data.base"):
        examples = load("gsm8k", tmp_path, "train", on_bad_row="skip")
    assert len(examples) == 2
    assert "skipped 2 malformed rows" in caplog.text and "train.jsonl:2: not valid JSON" in caplog.text


def test_skipping_every_row_leaves_an_empty_split_which_is_an_error(tmp_path):
    write(tmp_path, "mrpc/train.tsv", MRPC_HEADER + "7\t1\t2\ta\tb\n")
    with pytest.raises(DataError, match="the split is empty"):
        load("mrpc", tmp_path, "train", on_bad_row="skip")
    write(tmp_path, "gsm8k/test.jsonl", "\n")
    with pytest.raises(DataError, match="test.jsonl: the split is empty"):
        load("gsm8k", tmp_path, "test")


def test_bad_choices_are_listed(tmp_path):
    with pytest.raises(
        DataError, match=r"no split 'validation' for source=raw; choices: \['dev', 'test', 'train'\]"
    ):
        load("mrpc", tmp_path, "validation")
    with pytest.raises(DataError, match=r"source='kaggle' is not one of \['raw', 'reference', 'hub'\]"):
        load("mrpc", tmp_path, "train", source="kaggle")
    with pytest.raises(DataError, match=r"on_bad_row='ignore' is not one of \['error', 'skip'\]"):
        load("mrpc", tmp_path, "train", on_bad_row="ignore")
    with pytest.raises(DataError, match="no train split in the data directory"):
        load("freebaseqa", tmp_path, "train")
    with pytest.raises(DataError, match="Data file not found.*IMSM_DATA_DIR"):
        load("webq", tmp_path, "test")
    with pytest.raises(DataError, match="No data directory is set"):
        load_split(config("cola"), None, "train")


def test_limit_takes_the_first_examples(tmp_path):
    write(
        tmp_path,
        "gsm8k/test.jsonl",
        "\n".join(json.dumps({"question": f"q{i}", "answer": f"r\n#### {i}"}) for i in range(5)),
    )
    examples = load_split(config("gsm8k"), str(tmp_path), "test", limit=2)
    assert [e.gold for e in examples] == ["0", "1"]


def test_a_split_can_be_sliced_like_datasets(tmp_path):
    """``train[-2:]`` holds rows out of a split (a validation slice); the limit applies after the slice."""
    write(
        tmp_path,
        "gsm8k/test.jsonl",
        "\n".join(json.dumps({"question": f"q{i}", "answer": f"r\n#### {i}"}) for i in range(5)),
    )

    def golds(split: str, limit: int | None = None) -> list[str]:
        return [e.gold for e in load_split(config("gsm8k"), str(tmp_path), split, limit)]

    assert golds("test[-2:]") == ["3", "4"]
    assert golds("test[1:3]") == ["1", "2"]
    assert golds("test[:-3]") == ["0", "1"]
    assert golds("test[1:]", limit=2) == ["1", "2"]
    assert parse_split("train") == ("train", slice(None))
    with pytest.raises(DataError, match=r"bad split 'test\[1\]'.*name\[start:stop\]"):
        load_split(config("gsm8k"), str(tmp_path), "test[1]")


# --- the dataset base and the row reader --------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_every_config_loads_through_a_dataset_class(name):
    """``loader._target_`` is the ``load`` of a ``Dataset`` subclass named like its config, with all three sources."""
    cfg = dataset_config(name)
    cls = get_method(cfg.loader._target_).__self__
    assert issubclass(cls, Dataset) and cls.name == name
    assert cls.files and cls.reference.files and cls.hub.splits
    assert set(cfg.loader) - {"_target_"} == set(cls.loader_options)


def test_the_row_reader_locates_every_error_raised_while_a_row_is_parsed():
    reader = RowReader("f.jsonl")
    with pytest.raises(DataError) as info, reader.at(7):
        require({"a": 1}, "b")
    assert str(info.value) == "f.jsonl:7: missing field 'b' (fields present: ['a'])"
    with (
        pytest.raises(DataError, match=r"^f.jsonl:3 questions\[1\]: boom$"),
        reader.at(3),
        reader.at("3 questions[1]"),
    ):
        raise DataError("boom")  # nested rows: the innermost names it
    with pytest.raises(DataError, match=r"^other.json:1: x$"), reader.at(9):
        raise DataError("x", "other.json", 1)  # an error that knows its place keeps it
    with (
        pytest.raises(DataError, match=r"^doc.json:top level: missing field 'data'"),
        located("doc.json", "top level"),
    ):
        require({}, "data")

    skip = RowReader("f.tsv", "skip")
    with skip.at(1):
        raise DataError("a")
    with skip.at(2):
        raise DataError("b")
    assert (skip.skipped, skip.first) == (2, "f.tsv:1: a")
    with pytest.raises(KeyError), skip.at(3):
        raise KeyError("a bug, not a bad row")
    assert skip.skipped == 2


def test_a_data_error_keeps_its_location_across_processes():
    error = pickle.loads(pickle.dumps(DataError("bad", Path("f.jsonl"), 2)))
    assert (str(error), error.message, error.line) == ("f.jsonl:2: bad", "bad", 2)
    assert str(DataError("bad", "f.json")) == "f.json: bad" and str(DataError("bad")) == "bad"


def test_an_unknown_loader_option_lists_the_choices(tmp_path):
    cfg = config("multirc")
    cfg.loader.option_questoin = "x"
    with pytest.raises(
        DataError, match=r"unknown loader option\(s\) \['option_questoin'\].*\['option_question'\]"
    ):
        load_split(cfg, str(tmp_path), "val")


def test_skip_applies_per_row_and_each_file_reports_its_own_count(tmp_path, caplog):
    """A bad MultiRC question skips itself, a bad passage its whole line; CoLA's dev files count separately."""
    good = {"idx": 1, "question": "Q?", "answers": [{"text": "Yes", "idx": 0, "label": 1}]}
    passages = [
        {"idx": 0, "passage": {"text": "P.", "questions": [MULTIRC_LABEL_2, good]}},
        {"idx": 1, "passage": {"questions": [good]}},
        {"idx": 2, "passage": {"text": "P2.", "questions": [good]}},
    ]
    write(tmp_path, "multirc/val.jsonl", "".join(json.dumps(p) + "\n" for p in passages))
    write(tmp_path, "cola/raw/in_domain_dev.tsv", "s\t1\t\tok.\ns\tx\t\tbad.\n")
    write(tmp_path, "cola/raw/out_of_domain_dev.tsv", "s\t0\t\tok.\ns\t1\n")
    with caplog.at_level(logging.WARNING, logger="imsm.data.base"):
        examples = load("multirc", tmp_path, "val", on_bad_row="skip")
        assert [(e.meta["passage"], e.target) for e in examples] == [(0, "yes"), (2, "yes")]
        assert "skipped 2 malformed rows" in caplog.text
        assert r"val.jsonl:1 questions[0]: unknown label 2 in field 'label'" in caplog.text
        caplog.clear()
        assert [e.target for e in load("cola", tmp_path, "dev", on_bad_row="skip")] == ["yes", "no"]
    assert "in_domain_dev.tsv: skipped 1 malformed rows" in caplog.text
    assert "out_of_domain_dev.tsv: skipped 1 malformed rows" in caplog.text
    assert "expected 4 tab-separated fields" in caplog.text


def test_reference_examples_keep_their_line(tmp_path):
    rows = [
        '{"input": "p", "output": "yes"}',
        '{"input": "p", "output": "maybe"}',
        '{"input": "q", "output": "no"}',
    ]
    write(tmp_path, "imsm-reference/mrpc/data_test.json", "\n".join(rows) + "\n")
    examples = load("mrpc", tmp_path, "test", source="reference", on_bad_row="skip")
    assert [(e.prompt, e.target, e.meta["line"]) for e in examples] == [("p", "yes", 1), ("q", "no", 3)]
