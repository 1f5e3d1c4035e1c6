"""A real multirun over a setting the report has no column for still reports one row per value, never merged."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO
from helpers import write_gsm

from imsm.report import report


@pytest.mark.slow  # subprocess run(s), over 7 s: .ci/run runs the slow tests too
def test_a_gate_pooling_multirun_reports_as_two_rows(tmp_path):
    data = write_gsm(tmp_path / "data")
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "imsm.train",
            "-m",
            "gate.pooling=mean,max",
            "backbone=tiny_llama",
            "max_train_samples=8",
            "max_eval_samples=2",
            "eval.max_new_tokens=2",
            "eval.compare_base=false",
            "trainer.args.max_steps=1",
            "trainer.args.per_device_train_batch_size=4",
            "trainer.effective_batch_size=4",
            "trainer.args.disable_tqdm=true",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, IMSM_DATA_DIR=str(data), WANDB_MODE="offline"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert [r["choices"]["gate.pooling"] for r in records] == ["mean", "max"]

    out = tmp_path / "report"
    report(sweep, out=out)
    (table,) = [p for p in out.glob("*.csv") if "forgetting" not in p.name]
    rows = list(csv.DictReader(table.open()))
    methods = {r["method"] for r in rows}
    assert len(methods) == 2, methods  # one row per pooling: the sweep is not averaged into one cell
    assert any("max" in m for m in methods) and any("mean" in m for m in methods)
