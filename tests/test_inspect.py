"""imsm.inspect: the gate value per token of one example, from a saved run, as a PNG and a JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_imsm
from helpers import compose_train

from imsm.inspect import CONVENTION, NoGateError, inspect_run, text_table, token_gates
from imsm.model.siamese import IMSMModel

TEXT = "Tom has 3 apples and buys 4 more. How many apples does he have?"
ANSWER = "Tom has 3 + 4 = 7 apples.\n#### 7"


def compose_inspect(run_dir: Path, out: Path, *extra: str):
    return compose_train(
        [f"run_dir={run_dir}", f"text='{TEXT}'", f"out={out}", *extra], config_name="inspect"
    )


@pytest.fixture(scope="module")
def loaded(tiny_run):
    run_dir, _ = tiny_run
    return IMSMModel.from_pretrained(run_dir, device="cpu")


def reference_gates(model: IMSMModel, ids: list[int], n_prompt: int) -> list[float]:
    """g per position computed without ``streams`` / ``gate_values``: both streams, query means by hand, gate."""
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        base = model.stream_hidden(input_ids, mask, adapter=False)
        tuned = model.stream_hidden(input_ids, mask, adapter=True)
        bq, tq = base[:, :n_prompt].mean(1), tuned[:, :n_prompt].mean(1)
        return model.gate(base, tuned, bq, tq).float().mean(-1)[0].tolist()


def test_teacher_forced_answer_writes_picture_and_json_with_the_models_gate(tiny_run, loaded, tmp_path):
    run_dir, _ = tiny_run
    model, tokenizer = loaded
    out = inspect_run(compose_inspect(run_dir, tmp_path / "g.png", f"answer='{ANSWER}'"))
    assert out["png"] == tmp_path / "g.png" and out["json"] == tmp_path / "g.json"
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    record = json.loads(out["json"].read_text())
    assert record["run_dir"] == str(run_dir) and record["text"] == TEXT
    assert record["answer_source"] == "given" and record["convention"] == CONVENTION
    prompt_ids = tokenizer(TEXT)["input_ids"]
    answer_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + answer_ids
    rows = record["tokens"]
    assert [r["position"] for r in rows] == list(range(len(ids)))
    assert [r["token"] for r in rows] == [tokenizer.decode([i]) for i in ids]
    assert [r["part"] for r in rows] == ["prompt"] * len(prompt_ids) + ["answer"] * len(answer_ids)
    assert out["result"].ids == ids

    gates = [r["gate"] for r in rows]
    assert all(0.0 < g < 1.0 for g in gates)
    assert gates == pytest.approx(reference_gates(model, ids, len(prompt_ids)), abs=1e-6)
    assert len(set(gates)) > 1  # a query-aware gate varies per token


def test_without_answer_the_models_greedy_answer_is_read_up_to_its_eos(tiny_run, loaded, tmp_path):
    run_dir, _ = tiny_run
    model, tokenizer = loaded
    out = inspect_run(compose_inspect(run_dir, tmp_path / "g.png", "max_new_tokens=5"))
    result = out["result"]
    prompt_ids = tokenizer(TEXT)["input_ids"]
    eos = tokenizer.eos_token_id
    generated = model.generate(
        torch.tensor([prompt_ids]), torch.ones(1, len(prompt_ids), dtype=torch.long), 5, eos, eos
    )[0].tolist()
    expected = generated[: generated.index(eos) + 1] if eos in generated else generated
    assert result.answer_source == "generated" and result.n_prompt == len(prompt_ids)
    assert result.ids == prompt_ids + expected and 1 <= len(expected) <= 5
    record = json.loads(out["json"].read_text())
    assert [r["part"] for r in record["tokens"]].count("answer") == len(expected)
    assert [r["gate"] for r in record["tokens"]] == pytest.approx(
        reference_gates(model, result.ids, len(prompt_ids)), abs=1e-6
    )


def test_long_prompts_show_their_last_tokens_and_keep_all_in_the_json(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out = inspect_run(compose_inspect(run_dir, tmp_path / "g.png", "answer=7", "max_prompt_tokens=4"))
    result = out["result"]
    table = text_table(result, max_prompt_tokens=4).splitlines()
    hidden = result.n_prompt - 4
    assert f"({hidden} earlier prompt tokens in the JSON)" in table[1]
    assert len(table) == 2 + 4 + (len(result.ids) - result.n_prompt)
    assert table[2].split()[0] == str(hidden)  # the first shown row is the 4th-last prompt token
    assert len(json.loads(out["json"].read_text())["tokens"]) == len(result.ids)


def test_a_truncated_prompt_keeps_its_end_as_training_does(tiny_run, loaded, tmp_path):
    run_dir, _ = tiny_run
    _, tokenizer = loaded
    out = inspect_run(compose_inspect(run_dir, tmp_path / "g.png", "answer=7", "max_input_length=5"))
    result = out["result"]
    assert result.prompt_truncated and result.n_prompt == 5
    assert result.ids[:5] == tokenizer(TEXT)["input_ids"][-5:]


def test_a_run_without_gate_is_refused_with_a_clear_message(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    vanilla = tmp_path / "vanilla"
    shutil.copytree(run_dir, vanilla, ignore=shutil.ignore_patterns("checkpoints", "eval*"))
    (vanilla / "gate.safetensors").unlink()
    (vanilla / "gate.json").write_text(json.dumps({"type": "none", "pooling": "mean"}))
    with pytest.raises(NoGateError, match=r"no gate to inspect .*gate=none"):
        inspect_run(compose_inspect(vanilla, tmp_path / "g.png"))
    assert not (tmp_path / "g.png").exists()

    model = make_imsm(gate="none")  # the in-memory check too, for a model whose gate.json was not read
    with pytest.raises(NoGateError, match="no gate to inspect"):
        token_gates(model, None, TEXT, "7")


def test_the_json_never_overwrites_the_runs_gate_json(tiny_run):
    run_dir, _ = tiny_run
    before = (run_dir / "gate.json").read_text()
    with pytest.raises(ValueError, match="would write its JSON over the run's own"):
        inspect_run(compose_inspect(run_dir, run_dir / "gate.png", "answer=7"))
    assert (run_dir / "gate.json").read_text() == before
