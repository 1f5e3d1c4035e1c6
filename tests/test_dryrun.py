"""The weight-free parameter table: every paper backbone x method against hand arithmetic from config.json.

Shapes are (in_features, out_features) of each targeted linear. Per targeted linear:
LoRA r: r (in + out); DoRA: LoRA + out (the magnitude); AdaLoRA at init_r: r (in + out) + r (the singular values);
(IA)^3: out, or in for a feed-forward module. The query-aware gate: W_A 4d x r + W_B r x d = 5 d r.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO
from helpers import compose_train

from imsm.dryrun import dry_run

LLAMA2 = {
    "d": 4096,
    "layers": 32,
    "vocab": 32000,
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),  # 32 kv heads x 128
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 11008),
    "up_proj": (4096, 11008),
    "down_proj": (11008, 4096),
}
LLAMA3 = {
    **LLAMA2,
    "vocab": 128256,
    "k_proj": (4096, 1024),  # 8 kv heads x 128
    "v_proj": (4096, 1024),
    "gate_proj": (4096, 14336),
    "up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
QWEN1_5 = {
    "d": 2560,
    "layers": 40,
    "vocab": 151936,
    "q_proj": (2560, 2560),
    "k_proj": (2560, 2560),
    "v_proj": (2560, 2560),
    "o_proj": (2560, 2560),
    "gate_proj": (2560, 6912),
    "up_proj": (2560, 6912),
    "down_proj": (6912, 2560),
}
CHATGLM3 = {
    "d": 4096,
    "layers": 28,
    "vocab": 65024,
    "query_key_value": (4096, 4096 + 2 * 2 * 128),  # 32 query heads + 2 groups x (key, value) x 128 = 4608
    "dense": (4096, 4096),
    "mlp.dense_h_to_4h": (4096, 2 * 13696),  # SwiGLU: two halves
    "mlp.dense_4h_to_h": (13696, 4096),
}
TARGETS = {  # the paper's tables: lora / adalora, ia3 (+ feed-forward), dora
    "llama2": (
        LLAMA2,
        ["gate_proj", "down_proj", "up_proj"],
        ["k_proj", "v_proj", "down_proj"],
        ["down_proj"],
        ["q_proj", "v_proj"],
    ),
    "llama3": (
        LLAMA3,
        ["q_proj", "v_proj"],
        ["k_proj", "v_proj", "down_proj"],
        ["down_proj"],
        ["q_proj", "v_proj"],
    ),
    "llama3_1": (
        LLAMA3,
        ["q_proj", "v_proj"],
        ["k_proj", "v_proj", "down_proj"],
        ["down_proj"],
        ["q_proj", "v_proj"],
    ),
    "qwen1_5": (QWEN1_5, ["q_proj"], ["q_proj", "v_proj"], [], ["q_proj", "v_proj"]),
    "chatglm3": (
        CHATGLM3,
        ["query_key_value"],
        ["query_key_value", "mlp.dense_4h_to_h"],
        ["mlp.dense_4h_to_h"],
        ["query_key_value"],
    ),
}


def backbone_params(name: str) -> int:
    """All parameters of the backbone, from its config.json numbers (untied input and output embeddings)."""
    a = TARGETS[name][0]
    d, n = a["d"], a["layers"]
    if name == "chatglm3":
        qkv_in, qkv_out = a["query_key_value"]
        per_layer = qkv_in * qkv_out + qkv_out + 4096 * 4096 + 4096 * 2 * 13696 + 13696 * 4096 + 2 * d
        return 2 * a["vocab"] * d + n * per_layer + d  # embedding, output_layer, layers, final_layernorm
    linears = sum(a[k][0] * a[k][1] for k in a if k.endswith("_proj"))
    bias = a["q_proj"][1] + a["k_proj"][1] + a["v_proj"][1] if name == "qwen1_5" else 0  # Qwen2: q/k/v bias
    return (
        2 * a["vocab"] * d + n * (linears + bias + 2 * d) + d
    )  # embed, lm_head, layers (+2 norms), final norm


def expected_adapter(name: str, method: str) -> int:
    a, lora, ia3, ia3_ff, dora = TARGETS[name]
    n = a["layers"]
    if method == "lora":
        return n * sum(16 * (a[m][0] + a[m][1]) for m in lora)
    if method == "adalora":
        return n * sum(12 * (a[m][0] + a[m][1]) + 12 for m in lora)
    if method == "dora":
        return n * sum(16 * (a[m][0] + a[m][1]) + a[m][1] for m in dora)
    if method == "ia3":
        return n * sum(a[m][0] if m in ia3_ff else a[m][1] for m in ia3)
    raise AssertionError(method)


def test_hand_arithmetic_spot_checks():
    """A few totals written out, so the helpers above are checked too."""
    assert expected_adapter("llama3", "lora") == 32 * (16 * (4096 + 4096) + 16 * (4096 + 1024)) == 6_815_744
    assert expected_adapter("chatglm3", "ia3") == 28 * (4608 + 13696) == 512_512
    assert expected_adapter("qwen1_5", "adalora") == 40 * (12 * 5120 + 12) == 2_458_080
    assert backbone_params("llama3") == 8_030_261_248  # Meta-Llama-3-8B
    assert backbone_params("llama2") == 6_738_415_616  # Llama-2-7b
    assert backbone_params("chatglm3") == 6_243_584_000  # chatglm3-6b


@pytest.fixture
def no_downloads(monkeypatch):
    """A dry run must not load a backbone or tokenizer, nor touch the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded a backbone")

    monkeypatch.setattr("imsm.backbones.load_backbone", refuse)
    monkeypatch.setattr("imsm.model.build.load_backbone", refuse)


@pytest.mark.parametrize("method", ["lora", "ia3", "adalora", "dora"])
@pytest.mark.parametrize("backbone", ["chatglm3", "qwen1_5", "llama2", "llama3", "llama3_1"])
def test_dry_run_counts_equal_hand_computation(no_downloads, capsys, tmp_path, backbone, method):
    cfg = compose_train([f"backbone={backbone}", f"peft={method}", "dry_run=true", f"run_dir={tmp_path}"])
    row = dry_run(cfg)
    counts = row["trainable_parameters"]
    d = TARGETS[backbone][0]["d"]
    assert counts["adapter"] == expected_adapter(backbone, method)
    assert counts["gate"] == 5 * d * 8
    assert counts["total"] == expected_adapter(backbone, method) + 5 * d * 8
    assert row["backbone_params"] == backbone_params(backbone)
    assert row["percent"] == pytest.approx(100 * counts["total"] / backbone_params(backbone))
    out = capsys.readouterr().out
    assert f"{counts['adapter']:,}" in out and "% of backbone" in out
    assert (tmp_path / "dry_run.json").exists()


@pytest.mark.parametrize(
    ("gate", "rank", "factor"),
    [("query_aware", 4, 5), ("query_aware", 16, 5), ("no_query", 8, 3), ("none", 8, 0)],
)
def test_dry_run_honours_the_gate_options(no_downloads, capsys, gate, rank, factor):
    row = dry_run(compose_train(["backbone=llama3", f"gate={gate}", f"gate.rank={rank}", "dry_run=true"]))
    assert row["trainable_parameters"]["gate"] == factor * 4096 * rank


@pytest.mark.parametrize(("backbone", "d"), [("smollm2", 576), ("tiny_llama", 64), ("tiny_qwen", 64)])
def test_dry_run_works_for_the_small_backbones(no_downloads, capsys, backbone, d):
    row = dry_run(compose_train([f"backbone={backbone}", "peft=lora", "dry_run=true"]))
    n_layers = {"smollm2": 30, "tiny_llama": 2, "tiny_qwen": 2}[backbone]
    kv = {"smollm2": 3 * 64, "tiny_llama": 2 * 16, "tiny_qwen": 2 * 16}[backbone]  # kv heads x head_dim
    assert row["trainable_parameters"]["adapter"] == n_layers * 16 * ((d + d) + (d + kv))


@pytest.mark.slow  # subprocess run(s), over 7 s: .ci/run runs the slow tests too
def test_multirun_cli_prints_one_table_fast_and_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "imsm.dryrun",
            "-m",
            "backbone=llama2,chatglm3",
            "peft=lora,ia3",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [
        line for line in proc.stdout.splitlines() if line.startswith(("backbone ", "llama2 ", "chatglm3 "))
    ]
    assert lines[0].startswith("backbone ") and sum(line.startswith("backbone ") for line in lines) == 1
    assert [line.split()[:2] for line in lines[1:]] == [
        ["llama2", "lora"],
        ["llama2", "ia3"],
        ["chatglm3", "lora"],
        ["chatglm3", "ia3"],
    ]
    assert f"{expected_adapter('chatglm3', 'ia3'):,}" in proc.stdout
