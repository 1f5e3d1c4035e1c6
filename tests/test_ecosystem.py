"""Behaving like the tools researchers already use (issue 20): quick --help, a run directory that holds its own log
and Hydra record, files a team can read, relative paths under hydra.job.chdir, datasets from --config-dir."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from helpers import write_gsm

from imsm.io import umask


def run(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "IMSM_DATA_DIR"}
    env.update(WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_help_and_cfg_answer_before_torch_loads(tmp_path):
    for module in ("imsm.train", "imsm.evaluate"):
        start = time.perf_counter()
        done = run(["-m", module, "--help"], tmp_path)
        elapsed = time.perf_counter() - start
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Powered by Hydra" in done.stdout
        assert elapsed < 5, f"{module} --help took {elapsed:.1f}s"  # was ~8 s (torch, transformers, peft)
    evaluate_help = run(["-m", "imsm.evaluate", "--help"], tmp_path).stdout
    assert "imsm.evaluate: evaluate a saved run" in evaluate_help
    assert "Configuration groups" not in evaluate_help and "peft:" not in evaluate_help  # not its settings
    cfg = run(["-m", "imsm.train", "backbone=tiny_llama", "--cfg", "job"], tmp_path)
    assert cfg.returncode == 0 and "name: tiny_llama" in cfg.stdout


@pytest.mark.slow  # subprocess run(s), over 7 s: .ci/run runs the slow tests too
def test_the_run_directory_holds_its_log_record_and_readable_files(tmp_path):
    """hydra.job.chdir=true with relative paths, a dataset config from --config-dir evaluated as a forgetting set."""
    write_gsm(tmp_path / "data")
    extra = tmp_path / "extra" / "dataset"
    extra.mkdir(parents=True)
    yaml = (REPO / "imsm" / "conf" / "dataset" / "gsm8k.yaml").read_text()
    (extra / "mygsm.yaml").write_text(yaml.replace("name: gsm8k", "name: mygsm"))
    done = run(
        [
            "-m",
            "imsm.train",
            "--config-dir",
            str(tmp_path / "extra"),
            "backbone=tiny_llama",
            "data_dir=data",  # relative to where the command starts, although the job runs in its run_dir
            "run_dir=runs/one",
            "hydra.job.chdir=true",
            "eval_datasets=[mygsm]",
            "eval.compare_base=false",
            "max_train_samples=4",
            "max_eval_samples=2",
            "eval.max_new_tokens=3",
            "trainer.args.max_steps=2",
            "trainer.args.logging_steps=1",
            "trainer.args.per_device_train_batch_size=2",
            "trainer.effective_batch_size=2",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "one"
    log = (run_dir / "train.log").read_text()
    assert '] - step 1: {"loss": ' in log and "trainable: adapter" in log  # the curve and the summary
    assert "step 1: {" not in done.stdout  # the progress bar shows the curve; the console does not repeat it
    assert "eval_datasets=[mygsm]" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert not (tmp_path / "outputs").exists()  # no second folder for Hydra's record
    assert (run_dir / "eval" / "mygsm").is_dir()
    mode = 0o666 & ~umask()
    private = [
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if p.is_file() and stat.S_IMODE(p.stat().st_mode) != mode
    ]
    assert private == [], f"not {oct(mode)}: {private}"


# --- backbones: loading options, the name saved adapters give their base model --------------------------------
def test_loading_options_pass_through_to_from_pretrained(tmp_path):
    from omegaconf import OmegaConf
    from transformers import BitsAndBytesConfig

    from imsm.backbones import load_backbone, load_options

    tiny = OmegaConf.load(REPO / "imsm" / "conf" / "backbone" / "tiny_llama.yaml")
    model, tokenizer = load_backbone(tiny)
    model.save_pretrained(tmp_path / "local")
    tokenizer.save_pretrained(tmp_path / "local")
    cfg = OmegaConf.create(
        {
            "name": "local",
            "source": "hub",
            "name_or_path": str(tmp_path / "local"),
            "dtype": "fp32",
            "device": "cpu",
            "load_kwargs": {"attn_implementation": "eager"},
        }
    )
    loaded, _ = load_backbone(cfg)
    assert loaded.config._attn_implementation == "eager"
    cfg.load_kwargs = {"attn_implementation": "sdpa"}
    assert load_backbone(cfg)[0].config._attn_implementation == "sdpa"

    quantized = OmegaConf.create(
        {
            "source": "hub",
            "load_kwargs": {"quantization_config": {"_target_": "transformers.BitsAndBytesConfig"}},
        }
    )
    quantized.load_kwargs.quantization_config.load_in_4bit = True
    options = load_options(quantized)
    assert (
        isinstance(options["quantization_config"], BitsAndBytesConfig)
        and options["quantization_config"].load_in_4bit
    )
    cfg.load_kwargs = {"dtype": "bf16"}
    with pytest.raises(ValueError, match=r"load_kwargs sets \['dtype'\]: use backbone.dtype"):
        load_backbone(cfg)


def test_saved_adapters_name_the_base_model_a_colleague_can_load(tiny_run):
    import json

    from omegaconf import OmegaConf

    from imsm.backbones import public_name

    conf = REPO / "imsm" / "conf" / "backbone"
    assert public_name(OmegaConf.load(conf / "smollm2.yaml")) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_name(OmegaConf.load(conf / "llama3.yaml")) == "meta-llama/Meta-Llama-3-8B"
    local = OmegaConf.create({"source": "hub", "name_or_path": "/models/llama"})
    assert public_name(local) is None  # a path on one machine means nothing on another
    assert public_name(OmegaConf.merge(local, {"hub_id": "org/model"})) == "org/model"
    run_dir, _ = tiny_run
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] is None  # a tiny random backbone has no name to give


# --- the quickstart: a target learned and forgetting measured, side by side ------------------------------------
def test_the_quickstart_table_puts_frozen_vanilla_and_imsm_side_by_side(tmp_path):
    from helpers import compose_train

    from imsm.record import RunRecord, write_record
    from imsm.report.quickstart import main

    cfg = compose_train(["experiment=quickstart"])
    assert (cfg.dataset.name, list(cfg.eval_datasets), cfg.eval.scoring) == ("mrpc", ["webq"], "likelihood")

    def lik(nll: float, eos: float) -> dict:
        return {"nll": {"mean": nll}, "p_eos_first": {"mean": eos}}

    for gate, nll, eos, contains in (("none", 0.7, 0.6, 0.01), ("query_aware", 0.9, 0.3, 0.05)):
        write_record(
            tmp_path / gate,
            RunRecord(
                status="ok",
                experiment="quickstart",
                backbone="smollm2",
                gate=gate,
                dataset="mrpc",
                seed=42,
                global_steps=20,
                train_examples=320,
                eval_dataset_names=["webq"],
                metrics={"likelihood": lik(nll, 0.0), "choice": {"accuracy": 0.68}},
                base_metrics={"likelihood": lik(7.8, 0.02), "choice": {"accuracy": 0.37}},
                eval_datasets={"webq": {"accuracy": contains, "likelihood": lik(6.5, eos)}},
                base_eval_datasets={"webq": {"accuracy": 0.09, "likelihood": lik(7.0, 0.14)}},
            ),
        )
    assert main([str(tmp_path)]) == 0
    lines = (tmp_path / "quickstart.md").read_text().splitlines()
    assert lines[0] == "| measure | frozen model | vanilla LoRA | LoRA + IMSM |"
    assert "| mrpc: gold answer NLL (nats/token, lower = learned) | 7.800 | 0.700 | 0.900 |" in lines
    assert "| webq: P(EOS first) (would not answer) | 0.140 | 0.600 | 0.300 |" in lines
    assert "| webq: greedy answer contains gold | 0.090 | 0.010 | 0.050 |" in lines
    assert any("one seed" in line for line in lines)


def test_the_forgetting_curve_report_reads_every_jobs_step_scores(tmp_path):
    """eval.every_n_steps leaves eval_steps/step-N/<dataset>/metrics.json per job; the report pivots them."""
    import json

    from imsm.record import RunRecord, write_record
    from imsm.report.curves import main

    for gate, seed, slope in (("none", 1, 0.2), ("none", 2, 0.4), ("query_aware", 1, 0.1)):
        job = tmp_path / f"{gate}_s{seed}"
        write_record(job, RunRecord(status="ok", backbone="tiny_llama", gate=gate, dataset="mrpc", seed=seed))
        for step in (10, 20):
            d = job / "eval_steps" / f"step-{step}" / "webq"
            d.mkdir(parents=True)
            lik = {"nll": {"mean": 6.0}, "delta_nll": {"mean": slope * step / 10}}
            (d / "metrics.json").write_text(json.dumps({"dataset": "webq", "metrics": {"likelihood": lik}}))
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "report" / "curves.md").read_text()
    assert (
        "| vanilla | 0.300 | 0.600 |" in md and "| IMSM | 0.100 | 0.200 |" in md
    )  # means over seeds per step
    assert len((tmp_path / "report" / "curves.csv").read_text().splitlines()) == 1 + 3 * 2 * 2
    assert (tmp_path / "report" / "curves.png").read_bytes()[:4] == b"\x89PNG"
