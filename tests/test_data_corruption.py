"""Corrupted data files: every malformed file ends in a located error (file, line, field, what to do) or, with
``on_bad_row=skip``, in a skipped and counted row; nothing is loaded silently wrong. Over-long passage prompts lose
the passage's tail, never the question. Each case was found on a copy of the real files; fixtures here are tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import compose_train

import imsm.likelihood
from imsm.data import DataError, dataset_config, load_split
from imsm.data.base import SHRINKABLE, Example
from imsm.data.collate import TokenizedDataset, fit_prompt
from imsm.evaluation import SCORERS, EvalSettings, evaluate_datasets
from imsm.likelihood import Scored, likelihood_scores
from imsm.predict import evaluate_examples
from imsm.record import RunRecord

GSM = {"question": "Tom has 2 apples and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"}
MRPC_HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
FREEBASE = "s\tn\tm\tp\tnull\tm2\t{answer}\t{question}\n"


def gsm_line(**fields: object) -> str:
    return json.dumps({**GSM, **fields}) + "\n"


def passage(idx: int, text: str = "P.", question: object = None) -> str:
    """One SuperGLUE MultiRC jsonl line: a passage with one yes/no question."""
    q = question or {"idx": 0, "question": "Is it?", "answers": [{"text": "Yes", "idx": 0, "label": 1}]}
    return json.dumps({"idx": idx, "passage": {"text": text, "questions": [q]}}) + "\n"


def write(root: Path, relative: str, data: str | bytes) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def load(name: str, root: Path, split: str, **overrides: object):
    cfg = dataset_config(name)
    for key, value in overrides.items():
        cfg[key] = value
    return load_split(cfg, str(root), split)


# --- 1. bytes that are not UTF-8 ------------------------------------------------------------------------------------

GSM_BYTES = gsm_line().encode()
# (dataset, file, split, its lines with a bad byte on line 2, the field named, the examples left by skip)
LINE_FILES = [
    (
        "gsm8k",
        "gsm8k/train.jsonl",
        "train",
        [GSM_BYTES, GSM_BYTES.replace(b"buys", b"bu\xffys"), GSM_BYTES],
        None,
        2,
    ),
    (
        "mrpc",
        "mrpc/train.tsv",
        "train",
        [MRPC_HEADER.encode(), b"1\t1\t2\ta\xff\tb\n", b"0\t3\t4\tc\td\n"],
        "'#1 String'",
        1,
    ),
    (
        "cola",
        "cola/raw/in_domain_train.tsv",
        "train",
        [b"s\t1\t\tok .\n", b"s\t0\t*\tbad\xff .\n", b"s\t1\t\tyes .\n"],
        "'sentence'",
        2,
    ),
    (
        "multirc",
        "multirc/val.jsonl",
        "val",
        [passage(0).encode(), passage(1).encode().replace(b"P.", b"P\xff."), passage(2).encode()],
        None,
        2,
    ),
]


@pytest.mark.parametrize(
    ("name", "relative", "split", "lines", "field", "left"),
    LINE_FILES,
    ids=["gsm8k-jsonl", "mrpc-tsv", "cola-tsv", "multirc-jsonl"],
)
def test_a_bad_byte_in_a_line_file_names_file_line_and_byte_and_skip_skips_that_line(
    tmp_path, name, relative, split, lines, field, left
):
    write(tmp_path, relative, b"".join(lines))
    message = rf"{Path(relative).name}:2: not valid UTF-8: byte 0xFF at byte \d+ of the line"
    with pytest.raises(DataError, match=message) as e:
        load(name, tmp_path, split)
    assert "on_bad_row=skip" in str(e.value)  # says what to do
    if field:
        assert f"in field {field}" in str(e.value)
    examples = load(name, tmp_path, split, on_bad_row="skip")
    assert (len(examples), examples.skipped) == (left, 1)


def test_a_bad_byte_in_a_json_document_names_line_and_offset_and_is_never_skipped(tmp_path):
    doc = b'[{"utterance": "who?", "targetValue": "(list (description a))"},\n {"utterance": "x\xe9y"}]'
    write(tmp_path, "webquestions/webquestions.examples.test.json", doc)
    offset, line_start = doc.index(b"\xe9"), doc.index(b"\n") + 1
    message = rf"test.json:2: not valid UTF-8: byte 0xE9 at byte {offset - line_start + 1} of the line "
    message += rf"\(byte offset {offset} of the file\)"
    for policy in ("error", "skip"):
        with pytest.raises(DataError, match=message):
            load("webq", tmp_path, "test", on_bad_row=policy)


# --- 2. fields of the wrong type --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (gsm_line(answer=12), r"train.jsonl:2: field 'answer' should be a non-empty string, found int 12"),
        (
            gsm_line(question=["a", "b"]),
            r"train.jsonl:2: field 'question' should be a non-empty string, found list",
        ),
    ],
    ids=["answer-int", "question-list"],
)
def test_gsm8k_fields_of_the_wrong_type_are_located_and_skippable(tmp_path, row, message):
    write(tmp_path, "gsm8k/train.jsonl", gsm_line() + row + gsm_line())
    with pytest.raises(DataError, match=message):
        load("gsm8k", tmp_path, "train")
    examples = load("gsm8k", tmp_path, "train", on_bad_row="skip")
    assert (len(examples), examples.skipped) == (2, 1)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            json.dumps({"idx": 1, "passage": {"text": "P.", "questions": 5}}) + "\n",
            r"val.jsonl:2: field 'questions' should be a list, found int 5",
        ),
        (passage(1, question=7), r"val.jsonl:2 questions\[0\]: a question should be an object, found int 7"),
        (
            passage(1, question={"idx": 0, "question": "Is it?", "answers": [{"text": "Yes", "label": [1]}]}),
            r"val.jsonl:2 questions\[0\]: unknown label \[1\] in field 'label'",
        ),
    ],
    ids=["questions-int", "question-int", "label-list"],
)
def test_multirc_nested_fields_of_the_wrong_type_are_located_and_skippable(tmp_path, line, message):
    write(tmp_path, "multirc/val.jsonl", passage(0) + line + passage(2))
    with pytest.raises(DataError, match=message):
        load("multirc", tmp_path, "val")
    examples = load("multirc", tmp_path, "val", on_bad_row="skip")
    assert (len(examples), examples.skipped) == (2, 1)


def test_a_list_where_a_label_belongs_is_an_unknown_label_not_a_type_error(tmp_path):
    write(tmp_path, "imsm-reference/mrpc/data_test.json", '{"input": "p", "output": ["yes"]}\n')
    with pytest.raises(DataError, match=r"data_test.json:1: unknown label \['yes'\] in field 'output'"):
        load("mrpc", tmp_path, "test", source="reference")


def test_ropes_structure_of_the_wrong_type_names_its_position(tmp_path):
    write(tmp_path, "ropes/dev-v1.0.json", json.dumps({"data": [{"paragraphs": 3}]}))
    with pytest.raises(
        DataError, match=r"dev-v1.0.json:data\[0\]: field 'paragraphs' should be a list, found int 3"
    ):
        load("ropes", tmp_path, "dev")


# --- 3. rows that used to load with a gold no metric can score -------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            gsm_line(answer="so 5\n#### "),
            r"train.jsonl:2: field 'answer': the final answer '#### ' is not a number",
        ),
        (
            gsm_line(answer="so 12\n#### twelve"),
            r"train.jsonl:2: .*'#### twelve' is not a number.*gsm8k_accuracy",
        ),
        (gsm_line(question="  \n"), r"train.jsonl:2: field 'question' should be a non-empty string"),
    ],
    ids=["empty-final", "wordy-final", "blank-question"],
)
def test_gsm8k_rows_without_a_scorable_gold_or_a_question_are_errors(tmp_path, row, message):
    write(tmp_path, "gsm8k/train.jsonl", gsm_line() + row)
    with pytest.raises(DataError, match=message):
        load("gsm8k", tmp_path, "train")
    examples = load("gsm8k", tmp_path, "train", on_bad_row="skip")
    assert ([e.gold for e in examples], examples.skipped) == (["5"], 1)


def test_an_empty_reference_answer_is_an_error(tmp_path):
    rows = [
        {"input": "q1", "output": "so\nThe answer is 4."},
        {"input": "q2", "output": "so\nThe answer is ."},
    ]
    write(tmp_path, "imsm-reference/GSM8K/data_test.json", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        DataError, match=r"data_test.json:2: field 'output': the final answer 'The answer is .'"
    ):
        load("gsm8k", tmp_path, "test", source="reference")
    examples = load("gsm8k", tmp_path, "test", source="reference", on_bad_row="skip")
    assert ([e.gold for e in examples], examples.skipped) == (["4"], 1)


def test_an_empty_webq_alias_is_an_error(tmp_path):
    rows = [{"utterance": "who?", "targetValue": '(list (description "A") (description ""))'}]
    write(tmp_path, "webquestions/webquestions.examples.test.json", json.dumps(rows))
    with pytest.raises(DataError, match=r"test.json:\[0\]: field 'targetValue' has an empty description"):
        load("webq", tmp_path, "test")


# --- 4. an unclosed quote in FreebaseQA's CSV-quoted file ------------------------------------------------------------


def test_an_unclosed_quote_is_an_error_at_its_line_and_swallows_nothing(tmp_path):
    lines = [FREEBASE.format(answer=f"a{i}", question=f"Question {i}?") for i in range(5)]
    lines[1] = FREEBASE.format(answer="a1", question='"Who wrote ""Emma?')  # opened, never closed
    lines[3] = FREEBASE.format(answer="a3", question='"Who sang ""Help""?"')  # a well-quoted field
    write(tmp_path, "freebaseqa/v1.1-prerelease/FreebaseQA-eval.tab", "".join(lines))
    with pytest.raises(DataError, match=r"FreebaseQA-eval.tab:2: unbalanced double quote: field 'question'"):
        load("freebaseqa", tmp_path, "eval")
    examples = load("freebaseqa", tmp_path, "eval", on_bad_row="skip")
    assert examples.skipped == 1
    assert [e.gold for e in examples] == [["a0"], ["a2"], ["a3"], ["a4"]]
    assert 'Question:Who sang "Help"?\n' in examples[2].prompt


# --- 5. on_bad_row for evaluation sets, and the counts recorded ---------------------------------------------------


def test_the_skipped_count_survives_slices_and_limits(tmp_path):
    write(tmp_path, "gsm8k/test.jsonl", gsm_line() + "{oops\n" + gsm_line() + gsm_line())
    examples = load_split(dataset_config("gsm8k"), str(tmp_path), "test[1:]", limit=1, on_bad_row="skip")
    assert (len(examples), examples.skipped) == (1, 1)


def fake_scorer(model, tokenizer, examples, ds, settings, streams, desc):
    return {"n": len(examples)}, [{"prompt": e.prompt} for e in examples]


def eval_fixture(root: Path) -> Path:
    """A GSM8K test split with one malformed row, an MRPC test split with none."""
    write(root, "gsm8k/test.jsonl", gsm_line() + gsm_line(answer="#### ") + gsm_line())
    write(root, "mrpc/msr_paraphrase_test.txt", MRPC_HEADER + "1\t1\t2\ta\tb\n")
    return root


def run_eval(settings: EvalSettings, out: Path, monkeypatch) -> object:
    monkeypatch.setitem(SCORERS, "generate", fake_scorer)  # no model needed to load and count
    return evaluate_datasets(None, None, settings, out)


def test_eval_on_bad_row_skips_in_every_evaluation_set_and_the_counts_are_reported(tmp_path, monkeypatch):
    data = eval_fixture(tmp_path / "data")
    base = ["dataset=mrpc", "eval_datasets=[gsm8k]", f"data_dir={data}", "eval.compare_base=false"]
    with pytest.raises(DataError, match=r"test.jsonl:2: .*not a number.*on_bad_row=skip"):
        run_eval(EvalSettings.from_train_config(compose_train(base)), tmp_path / "strict", monkeypatch)

    settings = EvalSettings.from_train_config(compose_train([*base, "eval.on_bad_row=skip"]))
    result = run_eval(settings, tmp_path / "eval", monkeypatch)
    assert result.skipped_rows == {"mrpc/test": 0, "gsm8k/test": 1}
    assert result.model["gsm8k"]["n"] == 2
    assert json.loads((tmp_path / "eval" / "gsm8k" / "metrics.json").read_text())["skipped_rows"] == 1
    record = RunRecord(status="ok", skipped_rows={"mrpc/train": 0, **result.skipped_rows})
    assert RunRecord.from_dict(record.to_dict()).skipped_rows == {
        "mrpc/train": 0,
        "mrpc/test": 0,
        "gsm8k/test": 1,
    }


def test_the_targets_own_on_bad_row_applies_to_its_evaluation_and_imsm_evaluate_has_the_setting(
    tmp_path, monkeypatch
):
    data = eval_fixture(tmp_path / "data")
    cfg = compose_train(
        ["dataset=gsm8k", "dataset.on_bad_row=skip", f"data_dir={data}", "eval.compare_base=false"]
    )
    assert run_eval(EvalSettings.from_train_config(cfg), tmp_path / "a", monkeypatch).skipped_rows == {
        "gsm8k/test": 1
    }
    cfg = compose_train(
        ["datasets=[gsm8k,mrpc]", "on_bad_row=skip", f"data_dir={data}"], config_name="evaluate"
    )
    settings = EvalSettings.from_evaluate_config(cfg)
    assert run_eval(settings, tmp_path / "b", monkeypatch).skipped_rows == {"gsm8k/test": 1, "mrpc/test": 0}
    with pytest.raises(ValueError, match=r"eval.on_bad_row='ignore' is not one of \['error', 'skip'\]"):
        EvalSettings.from_train_config(compose_train(["eval.on_bad_row=ignore"]))


# --- 6. over-long prompts: the passage is cut, never the question --------------------------------------------------

QUESTION = "Did the otter swim across the wide river?"
PASSAGE = " ".join(f"Sentence {i} tells about the river and its otters." for i in range(60))


@pytest.fixture(scope="module")
def tok():
    from imsm.backbones import load_tokenizer, prepare_smollm2

    return load_tokenizer(prepare_smollm2())


def multirc_examples(root: Path) -> list[Example]:
    q = {"idx": 0, "question": QUESTION, "answers": [{"text": "Yes", "idx": 0, "label": 1}]}
    write(root, "multirc/val.jsonl", passage(0, PASSAGE, q))
    return load("multirc", root, "val")


def test_an_over_long_multirc_prompt_loses_the_passage_tail_not_the_question(tmp_path, tok):
    (example,) = multirc_examples(tmp_path)
    start, end = example.meta[SHRINKABLE]
    assert example.prompt[start:end] == PASSAGE
    assert len(tok(example.prompt)["input_ids"]) > 100
    ids = fit_prompt(tok, example.prompt, 100, shrinkable=example.meta[SHRINKABLE])
    text = tok.decode(ids)
    head, tail = example.prompt[:start], example.prompt[end:]  # instruction + question, answer cue
    assert QUESTION in head and len(ids) == 100
    assert text.startswith(head) and text.endswith(tail)
    assert "Sentence 0 tells" in text and "Sentence 59" not in text  # the passage keeps its start
    old_way = tok.decode(tok(example.prompt)["input_ids"][-100:])
    assert QUESTION not in old_way  # what keeping the last tokens did
    train = TokenizedDataset([example], tok, max_input_length=100, max_output_length=8)
    assert train[0]["query_len"] == [100] and train[0]["input_ids"][:100] == ids
    assert train.stats.prompts == 1
    chat = tok.decode(fit_prompt(tok, example.prompt, 120, chat_template=True, shrinkable=(start, end)))
    assert QUESTION in chat and chat.endswith(
        "\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
    )  # wrapped the same
    # a prompt without a marked passage keeps its last tokens, as before
    assert fit_prompt(tok, example.prompt, 100) == tok(example.prompt)["input_ids"][-100:]


def test_ropes_marks_its_background_so_a_question_first_template_keeps_the_question(tmp_path, tok):
    para = {
        "background": PASSAGE,
        "situation": "Two otters.",
        "qas": [{"id": "1", "question": QUESTION, "answers": [{"text": "yes"}]}],
    }
    write(tmp_path, "ropes/dev-v1.0.json", json.dumps({"data": [{"paragraphs": [para]}]}))
    template = "Question: {question}\nBackground: {background}\nSituation: {situation}\nAnswer:"
    (example,) = load("ropes", tmp_path, "dev", template=template)
    start, end = example.meta[SHRINKABLE]
    assert example.prompt[start:end] == PASSAGE
    text = tok.decode(fit_prompt(tok, example.prompt, 80, shrinkable=example.meta[SHRINKABLE]))
    assert text.startswith(f"Question: {QUESTION}\nBackground: Sentence 0")
    assert text.endswith("\nSituation: Two otters.\nAnswer:")


class FakeModel(torch.nn.Module):
    """Records the prompts it is given; generates EOS at once."""

    def __init__(self, eos: int) -> None:
        super().__init__()
        self.weight, self.eos, self.seen = torch.nn.Parameter(torch.zeros(1)), eos, []

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, streams):
        self.seen += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask, strict=True)]
        return torch.full((input_ids.shape[0], 1), self.eos)


def test_evaluation_prompts_are_cut_the_same_way(tmp_path, tok, monkeypatch):
    (example,) = multirc_examples(tmp_path)
    expected = fit_prompt(tok, example.prompt, 100, shrinkable=example.meta[SHRINKABLE])
    model = FakeModel(tok.eos_token_id)
    evaluate_examples(model, tok, [example], "yes_no_accuracy", max_new_tokens=1, max_input_length=100)
    assert model.seen == [expected]

    seen = []

    def score_batch(model, batch, streams, eos, choice_ids):
        prompts = [
            row[q.bool()].tolist() for row, q in zip(batch["input_ids"], batch["query_mask"], strict=True)
        ]
        seen.extend(prompts)
        return [Scored(tokens=1) for _ in prompts]

    monkeypatch.setattr(imsm.likelihood, "_score_batch", score_batch)
    likelihood_scores(model, tok, [example], max_input_length=100)
    assert seen == [expected]


def test_reference_multirc_prompts_mark_their_passage(tmp_path):
    prompt = f"Please answer.\nQuestion: {QUESTION} \nContent: {PASSAGE} \nAnswer:"
    write(
        tmp_path,
        "imsm-reference/multirc/data_test.json",
        json.dumps({"input": prompt, "output": "yes"}) + "\n",
    )
    (example,) = load("multirc", tmp_path, "yesno", source="reference")
    start, end = example.meta[SHRINKABLE]
    assert example.prompt[start:end] == PASSAGE
