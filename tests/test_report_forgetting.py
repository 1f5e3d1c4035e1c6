"""The forgetting experiment's analysis (imsm.report.forgetting) on hand-made run directories with known numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imsm.report.forgetting import analyse, main, mde_sd, on_curve, t_summary

# (arm, seed) -> (per-question ΔNLL added to every QA question, MRPC NLL of the model, gate value)
FINAL = {
    ("vanilla", 1): (0.30, 0.40, None),
    ("vanilla", 2): (0.50, 0.30, None),
    ("imsm", 1): (0.20, 0.45, 0.6),
    ("imsm", 2): (0.30, 0.35, 0.6),
}
EARLY = {1: (0.10, 0.60), 2: (0.20, 0.50)}  # vanilla after step 20: (ΔNLL, MRPC NLL)
FROZEN_MRPC = 0.80


def write_eval(d: Path, delta: float, mrpc_nll: float, gate: float | None) -> None:
    """``d/<name>/{metrics.json, predictions.jsonl}``: 4 QA questions per set (ΔNLL = delta ± 0.05), 2 MRPC pairs."""
    for name in ("webq", "freebaseqa", "mrpc"):
        (d / name).mkdir(parents=True)
        if name == "mrpc":
            rows = [
                {"nll": mrpc_nll, "nll_frozen": FROZEN_MRPC, "delta_nll": mrpc_nll - FROZEN_MRPC, "kl": 0.1}
            ] * 2
        else:
            rows = [
                {
                    "nll": 2 + delta + e,
                    "nll_frozen": 2.0,
                    "delta_nll": delta + e,
                    "kl": 0.2,
                    "p_eos_first": 0.1,
                }
                for e in (-0.05, 0.05, -0.05, 0.05)
            ]
        if gate is not None:
            rows = [{**r, "gate_mean": gate} for r in rows]
        metrics = {"choice": {"auroc": 0.7, "accuracy": 0.6}} if name == "mrpc" else {"accuracy": 0.05}
        (d / name / "metrics.json").write_text(json.dumps({"metrics": metrics}))
        (d / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for (arm, seed), (delta, nll, gate) in FINAL.items():
        run = tmp_path / arm / f"{seed - 1}_job_s{seed}"
        run.mkdir(parents=True)
        record = {"status": "ok", "backbone": "smollm2", "seed": seed, "gate": arm}
        (run / "metrics.json").write_text(json.dumps(record))
        write_eval(run / "eval", delta, nll, gate)
        if arm == "vanilla":
            write_eval(run / "eval_steps" / "step-20", *EARLY[seed], None)
    (tmp_path / "stages.md").write_text("| vanilla | `cmd` | 100 |\n| imsm | `cmd` | 200 |\n")
    return tmp_path


def test_contrasts_precondition_and_matched_fit_from_the_runs(root):
    s = analyse(root)
    assert s["precondition"]["met"]  # both vanilla seeds forget, CIs above 0
    c = s["contrasts"]["imsm"]
    assert c["seeds"] == [1, 2] and c["mean"] == pytest.approx(-0.15)  # (0.2 - 0.3 + 0.3 - 0.5) / 2
    assert c["recovered"] == pytest.approx(0.15 / 0.40)
    assert c["p_holm"] == pytest.approx(c["p"])  # the only test of the family
    # seed 1: IMSM's MRPC NLL 0.45 lies between vanilla's step 20 (0.60, 0.10) and end (0.40, 0.30): curve 0.25
    # seed 2: 0.35 between (0.50, 0.20) and (0.30, 0.50): curve 0.425
    m = s["matched"]["imsm"]
    assert m["seeds"] == [1, 2] and m["mean"] == pytest.approx(((0.20 - 0.25) + (0.30 - 0.425)) / 2)
    assert s["frozen"]["target_nll"] == pytest.approx(FROZEN_MRPC)
    assert s["arms"]["imsm"]["gate_qa"]["mean"] == pytest.approx(0.6)
    assert s["arms"]["vanilla@20"]["forgetting"]["mean"] == pytest.approx(0.15)
    kl = s["secondary"]["kl"]["imsm"]  # every run's KL is 0.2: a zero difference, no test
    assert kl["mean"] == pytest.approx(0.0) and kl["p"] is None and kl["vanilla"] == pytest.approx(0.2)
    # thirds of the frozen NLL: every question's frozen NLL is 2.0, so all fall in the best-known third
    assert s["by_knowledge"]["arms"]["imsm"][0] == pytest.approx(0.25)


def test_the_document_and_its_files_are_written(root, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results-forgetting-cpu-design.md").write_text("## Pre-registration\n")
    main([str(root), "--docs", str(docs)])
    text = (docs / "results-forgetting-cpu.md").read_text()
    assert "## Pre-registration" in text and "Precondition met (every seed's CI above 0): **yes**" in text
    assert "Wall time: 300 s" in text
    files = docs / "results-forgetting-cpu"
    assert {"summary.json", "per_question.csv", "fit_vs_forgetting.png", "gate.png"} <= {
        p.name for p in files.iterdir()
    }
    assert (files / "runs" / "imsm" / "s2" / "eval" / "webq" / "metrics.json").exists()
    lines = (files / "per_question.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 * 10 + 2 * 10  # header; 4 final + 2 early points x (8 QA + 2 MRPC rows)


def test_a_failed_run_is_listed_not_averaged(root):
    bad = root / "imsm" / "9_job_s3"
    bad.mkdir()
    (bad / "metrics.json").write_text(
        json.dumps({"status": "failed", "backbone": "smollm2", "seed": 3, "error": "OOM"})
    )
    s = analyse(root)
    assert s["failed"] == ["imsm seed 3: OOM"] and s["contrasts"]["imsm"]["seeds"] == [1, 2]


def test_statistics_helpers():
    assert mde_sd(3) == pytest.approx(3.26, abs=0.01)  # the 3-seed figure of docs/results-cpu.md
    assert mde_sd(4) == pytest.approx(2.13, abs=0.01)
    t = t_summary([1.0, 2.0, 3.0])
    assert t["mean"] == 2.0 and t["ci"][0] < 2.0 < t["ci"][1] and 0 < t["p"] < 0.1
    assert t_summary([0.5])["ci"] is None
    curve = [(0.8, 0.0), (0.6, 0.1), (0.4, 0.3)]
    assert on_curve(curve, 0.5) == pytest.approx(0.2)
    assert on_curve(curve, 0.3) is None and on_curve(curve, 0.9) is None
