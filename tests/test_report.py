"""imsm.report on hand-made metrics.json files: exact means, stds, t-test p-values, failures, grouping, files."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import pytest

import imsm
from imsm.report import (
    ReportError,
    build_table,
    holm,
    labels,
    load_runs,
    main,
    paired_ttest,
    report,
    report_spec,
)
from imsm.report.columns import parse_spec

SETUP = {"max_train_samples": 64, "max_eval_samples": 40}
# ROPES EM (Table 2's ROPES column) over seeds 1, 2, 3: IMSM - vanilla = 5, 6, 5 points -> t = 16 with 2 degrees of freedom
ROPES = {"none": [0.50, 0.52, 0.51], "query_aware": [0.55, 0.58, 0.56]}
WEBQ = {"none": [0.20, 0.30, 0.25], "query_aware": [0.30, 0.20, 0.40]}


def write_run(root: Path, name: str, **fields) -> Path:
    run = {
        "status": "ok",
        "experiment": "mysweep",
        "backbone": "smollm2",
        "peft": "lora",
        "gate": "none",
        "gate_rank": 0,
        "dataset": "ropes",
        "seed": 1,
        "eval_dataset_names": ["webq"],
        "setup": SETUP,
    }
    run.update(fields)
    path = root / name / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))
    return path


def md_table(text: str) -> list[list[str]]:
    """Every row of the Markdown pipe tables in ``text`` as stripped cells (headers kept, ``|:---|`` lines dropped)."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("|")
    ]
    return [r for r in rows if not set("".join(r)) <= set(":-")]


def by_method(text: str, column: int = 2) -> dict[str, list[str]]:
    """Table rows keyed by their method cell (column 2 with a target column, 1 without)."""
    return {row[column]: row for row in md_table(text)}


def forgetting_runs(root: Path, failed_seed: int | None = None) -> None:
    """Table 2: LoRA vanilla / IMSM on ROPES (+ WebQ), 3 seeds; AdaLoRA + IMSM failed for every seed."""
    table2 = {"experiment": "table2"}
    for gate in ("none", "query_aware"):
        for i, seed in enumerate((1, 2, 3)):
            if gate == "query_aware" and seed == failed_seed:
                write_run(
                    root,
                    f"{gate}_s{seed}",
                    gate=gate,
                    gate_rank=8,
                    seed=seed,
                    status="failed",
                    error="RuntimeError: boom",
                    **table2,
                )
                continue
            write_run(
                root,
                f"{gate}_s{seed}",
                gate=gate,
                gate_rank=8 if gate != "none" else 0,
                seed=seed,
                metrics={"exact_match": ROPES[gate][i], "f1": 0.1, "n": 40},
                base_metrics={"exact_match": 0.40, "f1": 0.1, "n": 40},
                eval_datasets={"webq": {"accuracy": WEBQ[gate][i], "n": 40}},
                base_eval_datasets={"webq": {"accuracy": 0.35, "n": 40}},
                **table2,
            )
    for seed in (1, 2, 3):
        write_run(
            root,
            f"adalora_s{seed}",
            peft="adalora",
            gate="query_aware",
            gate_rank=8,
            seed=seed,
            status="failed",
            error="ValueError: bad rank",
            **table2,
        )
    (root / "none_s1" / "eval" / "webq").mkdir(parents=True)  # per-dataset files are not runs
    (root / "none_s1" / "eval" / "webq" / "metrics.json").write_text(json.dumps({"dataset": "webq"}))


def test_paired_ttest_matches_the_closed_form():
    # paired differences 5, 6, 5: mean 16/3, sd 1/sqrt(3) -> t = 16, df 2; P(|T2| > t) = 1 - t / sqrt(t^2 + 2)
    p = paired_ttest({1: 55.0, 2: 58.0, 3: 56.0}, {1: 50.0, 2: 52.0, 3: 51.0})
    assert p == pytest.approx(1 - 16 / math.sqrt(258), rel=1e-9)
    assert paired_ttest({1: 1.0, 2: 2.0}, {1: 0.0, 3: 1.0}) is None  # one common seed: no test
    assert paired_ttest({1: 1.0, 2: 2.0}, {1: 1.0, 2: 2.0}) is None  # no difference at all: nan -> no mark
    assert paired_ttest({1: 0.0, 2: 0.0}, {1: 5.0, 2: 5.0}) is None  # constant difference: no test


def test_table_cells_means_stds_stars_original_and_failures(tmp_path):
    forgetting_runs(tmp_path)
    out = tmp_path / "report"
    path = report(tmp_path, out=out)
    md = (out / "table2.md").read_text()
    lines = by_method(md)
    # table2.yaml declares ROPES as EM; WebQ keeps its headline (accuracy); every column names its metric
    assert md_table(md)[0] == ["backbone", "target", "method", "ropes EM", "webq acc", "Avg", "p (Avg)"]
    # ropes: 50, 52, 51 -> 51.00 ± 1.00; 55, 58, 56 -> 56.33 ± 1.53, p = 0.0039 -> *
    # webq: 20, 30, 25 -> 25.00 ± 5.00; 30, 20, 40 -> 30.00 ± 10.00; differences 10, -10, 15: not significant
    assert lines["LoRA"][3:] == ["51.00 ± 1.00", "25.00 ± 5.00", "38.00", "-"]
    assert lines["LoRA + IMSM"][3:5] == ["56.33 ± 1.53*", "30.00 ± 10.00"]
    assert lines["Original"][3:] == ["40.00", "35.00", "37.50", "-"]  # one frozen model: no spread
    # a method whose every seed failed shows as failed in each cell, never as a gap or a zero
    assert lines["AdaLoRA + IMSM"][3:] == ["failed", "failed", "-", "-"]
    report_md = path.read_text()
    assert "Failed runs:" in report_md and "ValueError: bad rank" in report_md
    assert "![forgetting](table2_forgetting.png)" in report_md

    rows = list(csv.DictReader(io.StringIO((out / "table2.csv").read_text())))
    imsm_ropes = next(r for r in rows if r["method"] == "LoRA + IMSM" and r["dataset"] == "ropes")
    assert float(imsm_ropes["p_value_vs_vanilla"]) == pytest.approx(1 - 16 / math.sqrt(258), rel=1e-5)
    assert imsm_ropes["significant"] == "True" and json.loads(imsm_ropes["values"]) == [55.0, 58.0, 56.0]
    # Avg per seed: vanilla 35, 41, 38; IMSM 42.5, 39, 48 -> differences 7.5, -2, 10
    avg = next(r for r in rows if r["method"] == "LoRA + IMSM" and r["dataset"] == "Avg")
    from scipy.stats import ttest_rel

    assert float(avg["p_value_vs_vanilla"]) == pytest.approx(
        ttest_rel([42.5, 39, 48], [35, 41, 38]).pvalue, rel=1e-5
    )
    failed = next(r for r in rows if r["method"] == "AdaLoRA + IMSM" and r["dataset"] == "ropes")
    assert failed["n"] == "0" and failed["n_failed"] == "3" and failed["mean"] == ""
    # the Original row is one frozen model: n = 1 although 6 runs carry its score; no std, no test
    original = next(r for r in rows if r["method"] == "Original" and r["dataset"] == "ropes")
    assert (original["n"], original["std"], original["values"], original["p_value_vs_vanilla"]) == (
        "1",
        "",
        "[40.0]",
        "",
    )
    # Holm over the table's 3 tests (IMSM ropes, IMSM webq, IMSM Avg): ropes has the smallest p, times 3
    assert float(imsm_ropes["p_holm"]) == pytest.approx(3 * (1 - 16 / math.sqrt(258)), rel=1e-5)
    assert "(Holm 0.0117)" in report_md

    tex = (out / "table2.tex").read_text()
    assert r"56.33 $\pm$ 1.53$^*$" in tex and r"\toprule" in tex
    forgetting = (out / "table2_forgetting.md").read_text()
    # the target column is the gain of training, (score); a forgetting column the score (change vs Original)
    assert md_table(forgetting)[0][3:] == ["ropes EM (gain vs Original)", "webq acc (Δ vs Original)"]
    assert by_method(forgetting)["LoRA + IMSM"][3:] == ["+16.33 (56.33)", "30.00 (-5.00)"]
    assert (out / "table2_forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_seed_is_counted_in_its_cell(tmp_path):
    forgetting_runs(tmp_path, failed_seed=3)
    out = tmp_path / "r"
    report(tmp_path, out=out)
    md = (out / "table2.md").read_text()
    # IMSM ropes over seeds 1, 2 only: 55, 58 -> 56.50 ± 2.12, and the failed seed is shown
    assert "56.50 ± 2.12 (1 failed)" in md


def test_incompatible_runs_are_reported_separately(tmp_path):
    write_run(tmp_path, "a", metrics={"f1": 0.5}, eval_datasets={"webq": {"accuracy": 0.1}})
    write_run(
        tmp_path, "b", metrics={"f1": 0.9}, eval_dataset_names=["webq", "mrpc"], setup=SETUP
    )  # another evaluation set
    write_run(tmp_path, "c", metrics={"f1": 0.7}, setup={**SETUP, "max_eval_samples": 10})
    out = tmp_path / "r"
    text = report(tmp_path, out=out).read_text()
    assert text.count("## mysweep") == 3
    tables = [(out / f"{n}.md").read_text() for n in ("mysweep", "mysweep_b", "mysweep_c")]
    cells = sorted(next(c for c in ("50.00", "90.00", "70.00") if c in t) for t in tables)
    assert cells == ["50.00", "70.00", "90.00"]  # each alone, none averaged with another


def test_rerun_replaces_the_older_run_of_the_same_seed(tmp_path):
    old = write_run(tmp_path, "old", metrics={"f1": 0.1}, eval_dataset_names=[])
    new = write_run(tmp_path, "new", metrics={"f1": 0.3}, eval_dataset_names=[])
    os.utime(old, (1, 1))
    os.utime(new, (2, 2))
    report(tmp_path, out=tmp_path / "r")
    assert by_method((tmp_path / "r" / "mysweep.md").read_text(), 1)["LoRA"][2] == "30.00"


def test_table1_layout_one_row_per_method_across_targets(tmp_path):
    for target, score in (("mrpc", 0.8), ("cola", 0.4)):
        metric = {"mrpc": {"accuracy": 0.7, "f1": score}, "cola": {"mcc": score, "accuracy": 0.9}}[target]
        write_run(
            tmp_path,
            f"{target}",
            experiment="table1",
            dataset=target,
            eval_dataset_names=[],
            metrics=metric,
            base_metrics=metric,
        )
    table = build_table("table1", load_runs(tmp_path))
    # table1.yaml's columns: MRPC accuracy and F1, CoLA MCC (ROPES and GSM8K did not run)
    assert table.columns == ["mrpc acc", "mrpc F1", "cola MCC"]
    assert not table.show_target and not table.forgetting
    assert len(table.rows) == 2  # Original, LoRA: each spans both targets
    md = report(tmp_path, out=tmp_path / "r").read_text()
    # Avg over the declared columns these runs have: (70 + 80 + 40) / 3
    assert ["smollm2", "LoRA", "70.00", "80.00", "40.00", "63.33", "-"] in md_table(md)
    assert "Declared but not in these runs: ropes.exact_match, ropes.f1, gsm8k.accuracy." in md
    assert not (tmp_path / "r" / "table1_forgetting.png").exists()


def test_gate_rank_rows_and_plot(tmp_path):
    for rank, f1 in ((4, 0.2), (8, 0.3), (16, 0.25)):
        write_run(
            tmp_path,
            f"r{rank}",
            experiment="table6",
            dataset="gsm8k",
            gate="query_aware",
            gate_rank=rank,
            eval_datasets={"webq": {"accuracy": f1}},
            metrics={"accuracy": f1},
            base_metrics={"accuracy": 0.1},
            base_eval_datasets={"webq": {"accuracy": 0.1}},
        )
    out = tmp_path / "r"
    md = report(tmp_path, out=out).read_text()
    for rank in (4, 8, 16):
        assert f"LoRA + IMSM (r={rank})" in md
    assert (out / "table6_rank.png").exists() and (out / "table6_forgetting.png").exists()


def test_speed_runs_make_the_tokens_per_second_table(tmp_path):
    for seed, (gated, vanilla) in ((1, (90.0, 100.0)), (2, (80.0, 100.0))):
        write_run(
            tmp_path,
            f"s{seed}",
            experiment="table5",
            gate="query_aware",
            seed=seed,
            eval_dataset_names=[],
            setup={"speed": {"new_tokens": 8}},
            speed={"tokens_per_s": {"imsm": gated, "vanilla": vanilla}, "imsm/vanilla": gated / vanilla},
        )
    write_run(
        tmp_path,
        "ia3",
        experiment="table5",
        peft="ia3",
        status="failed",
        error="OOM",
        eval_dataset_names=[],
        setup={"speed": {"new_tokens": 8}},
    )
    md = report(tmp_path, out=tmp_path / "r").read_text()
    assert ["smollm2", "LoRA", "100.0 ± 0.0", "85.0 ± 7.1", "0.850 ± 0.071"] in md_table(md)
    assert ["smollm2", "IA3", "failed", "failed", "failed"] in md_table(md)


def test_no_runs_or_unknown_table_is_a_clear_message(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    write_run(tmp_path, "a", metrics={"f1": 0.5})
    assert main([str(tmp_path), "--table", "table9"]) == 2
    assert "experiments found: ['mysweep']" in capsys.readouterr().err
    with pytest.raises(ReportError):
        report(tmp_path, table="table9")
    assert main([str(tmp_path), "--table", "mysweep"]) == 0
    assert ["smollm2", "ropes", "LoRA", "50.00", "missing", "-", "-"] in md_table(capsys.readouterr().out)


def test_an_ablation_with_the_fixed_gate_is_not_a_rank_sweep(tmp_path):
    """The fixed 0.5 mix records gate rank 0; beside r=8 gates it must not turn the table into Table 6's layout."""
    gates = {"none": 0, "query_aware": 8, "no_query": 8, "fixed": 0}
    for gate, rank in gates.items():
        write_run(tmp_path, gate, experiment="table4", gate=gate, gate_rank=rank, metrics={"f1": 0.5})
    report(tmp_path)
    table = (tmp_path / "report" / "table4.md").read_text()
    assert "(r=" not in table and not (tmp_path / "report" / "table4_rank.png").exists()
    assert "LoRA + IMSM w/o gate" in table and "LoRA + IMSM w/o query" in table


def sweep_runs(
    root: Path, key: str, values: tuple[str, ...], scores: dict[str, list[float]], **fields
) -> None:
    """A sweep of ``key`` over ``values`` x seeds 1, 2 (query-aware gate), each job's overrides in ``choices``."""
    for value in values:
        for seed, score in zip((1, 2), scores[value], strict=True):
            write_run(
                root,
                f"{key}={value}_s{seed}",
                gate="query_aware",
                gate_rank=8,
                seed=seed,
                eval_dataset_names=[],
                metrics={"f1": score},
                choices={"peft": "lora", "gate": "query_aware", key: value, "seed": str(seed)},
                **fields,
            )


def test_a_pooling_sweep_is_two_rows_never_one_merged_cell(tmp_path):
    sweep_runs(tmp_path, "gate.pooling", ("mean", "max"), {"mean": [0.50, 0.52], "max": [0.60, 0.64]})
    table = build_table("table2", load_runs(tmp_path))
    assert table.choice_keys == ["gate.pooling"] and len(table.rows) == 2  # mean, max
    md = report(tmp_path, out=tmp_path / "r").read_text()
    rows = by_method(md, 1)  # one dataset per run: no target column
    assert rows["LoRA + IMSM (gate.pooling=max)"][2] == "62.00 ± 2.83"
    assert rows["LoRA + IMSM (gate.pooling=mean)"][2] == "51.00 ± 1.41"
    assert "Rows also split by the swept gate.pooling." in md
    tidy = list(csv.DictReader(io.StringIO((tmp_path / "r" / "mysweep.csv").read_text())))
    assert {(r["gate.pooling"], r["values"]) for r in tidy if r["dataset"] == "ropes"} == {
        ("mean", "[50.0, 52.0]"),
        ("max", "[60.0, 64.0]"),
    }


def test_a_learning_rate_sweep_is_two_rows_and_dedupe_keeps_both(tmp_path):
    """Same seeds, other learning rate: not a re-run of the same job, so neither replaces the other."""
    key = "trainer.args.learning_rate"
    sweep_runs(tmp_path, key, ("3e-4", "1e-4"), {"3e-4": [0.40, 0.42], "1e-4": [0.30, 0.30]})
    md = report(tmp_path, out=tmp_path / "r").read_text()
    rows = by_method(md, 1)
    assert rows[f"LoRA + IMSM ({key}=1e-4)"][2] == "30.00 ± 0.00"
    assert rows[f"LoRA + IMSM ({key}=3e-4)"][2] == "41.00 ± 1.41"
    methods = [r[1] for r in md_table(md)[1:]]
    assert methods.index(f"LoRA + IMSM ({key}=1e-4)") < methods.index(f"LoRA + IMSM ({key}=3e-4)")  # by value


def test_rerun_with_the_same_choices_replaces_the_older_one(tmp_path):
    choices = {"gate.pooling": "max", "seed": "1"}
    old = write_run(tmp_path, "old", metrics={"f1": 0.1}, eval_dataset_names=[], choices=choices)
    new = write_run(tmp_path, "new", metrics={"f1": 0.3}, eval_dataset_names=[], choices=choices)
    other = write_run(
        tmp_path, "mean", metrics={"f1": 0.5}, eval_dataset_names=[], choices={"gate.pooling": "mean"}
    )
    for i, path in enumerate((old, new, other)):
        os.utime(path, (i + 1, i + 1))
    rows = by_method(report(tmp_path, out=tmp_path / "r").read_text(), 1)
    assert rows["LoRA (gate.pooling=max)"][2] == "30.00"  # one seed: the newer run, no spread
    assert rows["LoRA (gate.pooling=mean)"][2] == "50.00"


def test_gated_sweep_rows_are_tested_against_vanilla_runs_without_gate_choices(tmp_path):
    """Vanilla runs set no ``gate.*`` key; each pooling row is still compared with them (paired over seeds)."""
    sweep_runs(tmp_path, "gate.pooling", ("mean", "max"), {"mean": [0.55, 0.58], "max": [0.60, 0.61]})
    for seed, score in ((1, 0.50), (2, 0.52)):
        write_run(tmp_path, f"none_s{seed}", seed=seed, eval_dataset_names=[], metrics={"f1": score})
    table = build_table("table2", load_runs(tmp_path))
    mean_row = next(r for r in table.rows if ("gate.pooling", "mean") in r.choices)
    assert table.control(mean_row) is not None and table.control(mean_row).gate == "none"
    cell = table.cells[(mean_row, "ropes")]
    assert cell.p_value == pytest.approx(paired_ttest({1: 55.0, 2: 58.0}, {1: 50.0, 2: 52.0}))


def test_labels_come_from_the_config_files(tmp_path):
    for peft in ("loramoe", "loramoe_nolbc", "my_own_method"):
        write_run(tmp_path, peft, experiment="fig3", peft=peft, eval_dataset_names=[], metrics={"f1": 0.5})
    methods = [r[1] for r in md_table(report(tmp_path, out=tmp_path / "r").read_text())[1:]]
    assert methods == ["LoRAMoE", "LoRAMoE w/o LBC", "my_own_method"]  # an unknown name prints as itself
    assert labels.peft_label("lora") == "LoRA" and labels.dataset_label("gsm8k") == "GSM8K"
    assert labels.gate_suffix("query_aware") == " + IMSM" and labels.gate_suffix("none") == ""
    assert labels.gate_suffix("my_gate") == " + gate my_gate"


def test_every_peft_and_dataset_file_declares_its_label_and_headline():
    for group in ("peft", "dataset"):
        for path in sorted((imsm.CONF_DIR / group).glob("*.yaml")):
            entry = labels.conf_entry(group, path.stem)
            assert entry.get("label"), f"{path}: no label"
            if group == "dataset":
                assert isinstance(entry.get("headline"), list) and entry["headline"], (
                    f"{path}: no headline list"
                )


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("cola", 30.0),  # MCC
        ("mrpc", 20.0),  # F1
        ("ropes", 20.0),  # F1
        ("gsm8k", 10.0),  # accuracy
        ("webq", 10.0),
        ("unknown_set", 30.0),  # no file: the first of mcc, f1, accuracy, exact_match
    ],
)
def test_headline_metric_per_dataset(dataset, expected):
    metrics = {"accuracy": 0.1, "f1": 0.2, "mcc": 0.3, "exact_match": 0.4, "n": 10}
    assert labels.headline_score(dataset, metrics) == pytest.approx(expected)


def test_a_headline_metric_the_run_lacks_is_missing_not_another_metric():
    assert labels.headline_score("cola", {"accuracy": 0.9, "n": 10}) is None


def test_python_dash_m_still_runs(tmp_path):
    import subprocess
    import sys

    write_run(tmp_path, "a", metrics={"f1": 0.5}, eval_dataset_names=[])
    proc = subprocess.run(
        [sys.executable, "-m", "imsm.report", str(tmp_path), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert ["smollm2", "LoRA", "50.00", "50.00", "-"] in md_table(proc.stdout)


# --- the paper's columns, averages, Holm, likelihood and gate tables ----------------------------------------------

TABLE1_METRICS = {  # per target, the metric dict a run records (fractions)
    "mrpc": ("accuracy", "f1"),
    "cola": ("mcc",),
    "ropes": ("exact_match", "f1"),
    "gsm8k": ("accuracy",),
}


def paper_runs(root: Path, experiment: str, scores: dict[tuple[str, int], list[float]], base: list[float]):
    """One run per (gate, seed) and target; ``scores[(gate, seed)]``: the numbers of TABLE1_METRICS in order."""
    targets = [t for t in TABLE1_METRICS if experiment == "table1" or t != "gsm8k"]
    for (gate, seed), values in scores.items():
        numbers, frozen = iter(values), iter(base)
        for target in targets:
            names = TABLE1_METRICS[target]
            write_run(
                root,
                f"{gate}_{target}_s{seed}",
                experiment=experiment,
                dataset=target,
                gate=gate,
                gate_rank=8 if gate in ("query_aware", "no_query") else 0,
                seed=seed,
                eval_dataset_names=[],
                metrics={m: next(numbers) for m in names},
                base_metrics={m: next(frozen) for m in names},
            )


def test_table1_shows_the_papers_six_columns_and_their_average(tmp_path):
    scores = {
        ("none", 1): [0.70, 0.80, 0.30, 0.50, 0.60, 0.20],
        ("none", 2): [0.72, 0.82, 0.32, 0.52, 0.62, 0.22],
        ("query_aware", 1): [0.75, 0.85, 0.35, 0.55, 0.65, 0.25],
        ("query_aware", 2): [0.78, 0.88, 0.38, 0.58, 0.68, 0.28],
    }
    paper_runs(tmp_path, "table1", scores, base=[0.60, 0.70, 0.10, 0.40, 0.50, 0.10])
    out = tmp_path / "r"
    report(tmp_path, out=out)
    rows = md_table((out / "table1.md").read_text())
    columns = ["mrpc acc", "mrpc F1", "cola MCC", "ropes EM", "ropes F1", "gsm8k acc"]
    assert rows[0] == ["backbone", "method", *columns, "Avg", "p (Avg)"]
    lines = by_method((out / "table1.md").read_text(), 1)
    # Avg = the mean of the six numbers: Original (60 + 70 + 10 + 40 + 50 + 10) / 6 = 40
    assert lines["Original"][2:] == ["60.00", "70.00", "10.00", "40.00", "50.00", "10.00", "40.00", "-"]
    # vanilla (71 + 81 + 31 + 51 + 61 + 21) / 6 = 52.67 (the four headlines alone would give 48.50)
    assert lines["LoRA"][2:9] == ["71.00 ± 1.41", "81.00 ± 1.41", "31.00 ± 1.41", "51.00 ± 1.41"] + [
        "61.00 ± 1.41",
        "21.00 ± 1.41",
        "52.67",
    ]
    # IMSM (76.5 + 86.5 + 36.5 + 56.5 + 66.5 + 26.5) / 6 = 58.17; per-seed averages 56.67, 59.67 vs 51.67, 53.67
    assert lines["LoRA + IMSM"][8] == "58.17"
    from scipy.stats import ttest_rel

    p_avg = ttest_rel([340 / 6, 358 / 6], [310 / 6, 322 / 6]).pvalue
    assert float(lines["LoRA + IMSM"][9]) == pytest.approx(p_avg, rel=1e-2)
    tidy = list(csv.DictReader(io.StringIO((out / "table1.csv").read_text())))
    mrpc_acc = next(r for r in tidy if r["method"] == "LoRA" and r["column"] == "mrpc acc")
    assert (mrpc_acc["dataset"], mrpc_acc["metric"], mrpc_acc["values"]) == (
        "mrpc",
        "accuracy",
        "[70.0, 72.0]",
    )
    avg = next(r for r in tidy if r["method"] == "LoRA" and r["column"] == "Avg")
    assert json.loads(avg["values"]) == pytest.approx([310 / 6, 322 / 6], abs=1e-4)


def test_table4_average_is_the_papers_five_numbers(tmp_path):
    scores = {(g, 1): [0.70, 0.80, 0.30, 0.50, 0.60] for g in ("none", "query_aware", "no_query", "fixed")}
    scores[("fixed", 1)] = [0.60, 0.70, 0.20, 0.40, 0.50]
    paper_runs(tmp_path, "table4", scores, base=[0.5, 0.5, 0.0, 0.3, 0.4])
    report(tmp_path, out=tmp_path / "r")
    rows = md_table((tmp_path / "r" / "table4.md").read_text())
    assert rows[0][2:] == ["mrpc acc", "mrpc F1", "cola MCC", "ropes EM", "ropes F1", "Avg", "p (Avg)"]
    lines = by_method((tmp_path / "r" / "table4.md").read_text(), 1)
    assert lines["LoRA"][7] == "58.00"  # (70 + 80 + 30 + 50 + 60) / 5
    assert lines["LoRA + IMSM w/o gate"][7] == "48.00"  # (60 + 70 + 20 + 40 + 50) / 5
    assert lines["Original"][7] == "34.00"  # (50 + 50 + 0 + 30 + 40) / 5


def test_table2_columns_ropes_em_and_mrpc_accuracy(tmp_path):
    """The paper's Table 2 ROPES and MRPC numbers are Table 1's EM and accuracy: table2.yaml declares them."""
    evals = ["webq", "multirc", "mrpc", "freebaseqa"]
    for seed, em in ((1, 0.58), (2, 0.60)):
        write_run(
            tmp_path,
            f"s{seed}",
            experiment="table2_cpu",  # a scale overlay keeps its table's layout
            seed=seed,
            eval_dataset_names=evals,
            metrics={"exact_match": em, "f1": 0.9},
            base_metrics={"exact_match": 0.3, "f1": 0.4},
            eval_datasets={d: {"accuracy": 0.5, "f1": 0.1} for d in evals},
            base_eval_datasets={d: {"accuracy": 0.6, "f1": 0.2} for d in evals},
        )
    report(tmp_path, out=tmp_path / "r")
    md = (tmp_path / "r" / "table2_cpu.md").read_text()
    assert md_table(md)[0][3:8] == ["ropes EM", "webq acc", "multirc acc", "mrpc acc", "freebaseqa acc"]
    assert by_method(md)["LoRA"][3:8] == ["59.00 ± 1.41", "50.00 ± 0.00", "50.00 ± 0.00", "50.00 ± 0.00"] + [
        "50.00 ± 0.00"
    ]
    forgetting = md_table((tmp_path / "r" / "table2_cpu_forgetting.md").read_text())
    assert forgetting[0][3] == "ropes EM (gain vs Original)" and forgetting[1][3] == "+29.00 (59.00)"
    assert forgetting[0][6] == "mrpc acc (Δ vs Original)" and forgetting[1][6] == "50.00 (-10.00)"


def test_holm_step_down_matches_a_hand_computed_example():
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): x4 = 0.02, x3 = 0.03, x2 = 0.06, x1 = 0.04 -> max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005, None]) == pytest.approx([0.03, 0.06, 0.06, 0.02, None])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert holm([None]) == [None] and holm([]) == []


def test_report_spec_is_read_from_the_experiment_file_and_checked():
    spec = report_spec("fig4_cpu")
    assert spec.columns == {"ropes": ("exact_match",), "mrpc": ("accuracy",)} and spec.average is None
    assert report_spec("table1").average == (
        "mrpc.accuracy",
        "mrpc.f1",
        "cola.mcc",
        "ropes.exact_match",
        "ropes.f1",
        "gsm8k.accuracy",
    )
    assert not report_spec("my_own").declared and not report_spec(None).declared
    with pytest.raises(ValueError, match=r"x.yaml: report.columns.mrpc: expected a metric name"):
        parse_spec({"columns": {"mrpc": []}}, "x.yaml")
    with pytest.raises(ValueError, match=r"report.average names \['mrpc.mcc'\]"):
        parse_spec({"columns": {"mrpc": ["f1"]}, "average": ["mrpc.mcc"]}, "x.yaml")
    with pytest.raises(ValueError, match="keys columns, average"):
        parse_spec({"colums": {}}, "x.yaml")


def likelihood(delta: float, ci: tuple[float, float] | None = None) -> dict:
    lo, hi = ci or (delta - 0.1, delta + 0.1)
    return {
        "n": 40,
        "answer_tokens": 200,
        "nll": {"mean": 2.0 + delta, "ci": [1.9 + delta, 2.1 + delta]},
        "nll_frozen": {"mean": 2.0, "ci": [1.9, 2.1]},
        "delta_nll": {"mean": delta, "ci": [lo, hi]},
        "kl": {"mean": abs(delta) / 2, "ci": [0.0, abs(delta)]},
        "p_eos_first": {"mean": 0.01, "ci": [0.0, 0.02]},
    }


def test_likelihood_choice_and_gate_tables(tmp_path):
    gate = {"mean": 0.3, "q05": 0.1, "q25": 0.2, "q50": 0.3, "q75": 0.4, "q95": 0.5, "n_positions": 100}
    runs = [("none", 1, 0.42, (0.31, 0.55)), ("query_aware", 1, 0.10, None), ("query_aware", 2, 0.20, None)]
    for g, seed, delta, ci in runs:
        gated = g == "query_aware"
        write_run(
            tmp_path,
            f"{g}_s{seed}",
            gate=g,
            gate_rank=8 if gated else 0,
            seed=seed,
            eval_dataset_names=["mrpc"],
            metrics={"f1": 0.5, "likelihood": likelihood(delta, ci), **({"gate": gate} if gated else {})},
            base_metrics={"f1": 0.4, "likelihood": likelihood(0.0, (0.0, 0.0))},
            eval_datasets={
                "mrpc": {
                    "f1": 0.5,
                    "likelihood": likelihood(2 * delta),
                    "choice": {"accuracy": 0.6 + seed / 100, "f1": 0.5, "mcc": 0.2, "auroc": 0.7, "n": 40},
                    **({"gate": {**gate, "q50": 0.6 + seed / 10, "mean": 0.6}} if gated else {}),
                }
            },
        )
    out = tmp_path / "r"
    text = report(tmp_path, out=out).read_text()
    lk = by_method((out / "mysweep_likelihood.md").read_text())
    assert md_table((out / "mysweep_likelihood.md").read_text())[0] == ["backbone", "target", "method"] + [
        "ropes",
        "mrpc",
    ]
    assert lk["LoRA"][3:] == ["0.420 [0.310, 0.550]", "0.840 [0.740, 0.940]"]  # one seed: its bootstrap CI
    assert lk["LoRA + IMSM"][3:] == ["0.150 ± 0.071", "0.300 ± 0.141"]  # two seeds: mean ± std over seeds
    assert lk["Original"][3] == "0.000 [0.000, 0.000]"  # the frozen model vs itself, one model
    tidy = list(csv.DictReader(io.StringIO((out / "mysweep_likelihood.csv").read_text())))
    metrics = {(r["method"], r["dataset"], r["metric"]) for r in tidy}
    for m in ("delta_nll", "nll", "kl", "p_eos_first"):
        assert ("LoRA + IMSM", "ropes", m) in metrics
    kl = next(r for r in tidy if (r["method"], r["dataset"], r["metric"]) == ("LoRA", "ropes", "kl"))
    assert (float(kl["mean"]), float(kl["ci_low"]), float(kl["ci_high"]), kl["n_seeds"]) == (
        0.21,
        0.0,
        0.42,
        "1",
    )
    choice = by_method((out / "mysweep_choice.md").read_text())
    assert md_table((out / "mysweep_choice.md").read_text())[0][3:] == ["mrpc acc", "mrpc F1", "mrpc MCC"] + [
        "mrpc AUROC"
    ]
    assert choice["LoRA + IMSM"][3:5] == ["61.50 ± 0.71", "50.00 ± 0.00"]
    assert "Likelihood: Δ NLL" in text and "Choice scoring" in text
    # gate: a box per dataset for the gated row, linked from report.md; quantiles averaged over seeds
    assert "![gate](mysweep_gate.png)" in text
    assert (out / "mysweep_gate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gates = list(csv.DictReader(io.StringIO((out / "mysweep_gate.csv").read_text())))
    assert [(r["method"], r["dataset"], float(r["q50"]), r["n_seeds"]) for r in gates] == [
        ("LoRA + IMSM", "ropes", 0.3, "2"),
        ("LoRA + IMSM", "mrpc", 0.75, "2"),  # (0.7 + 0.8) / 2
    ]


def test_runs_without_likelihood_or_gate_get_no_such_section(tmp_path):
    forgetting_runs(tmp_path)
    text = report(tmp_path, out=tmp_path / "r").read_text()
    assert "Likelihood" not in text and "![gate]" not in text
    assert (
        not (tmp_path / "r" / "table2_likelihood.md").exists()
        and not (tmp_path / "r" / "table2_gate.png").exists()
    )


def test_a_dataset_that_is_one_rows_target_and_anothers_forgetting_set(tmp_path):
    for target in ("mrpc", "cola"):
        write_run(
            tmp_path,
            target,
            dataset=target,
            eval_dataset_names=["cola", "mrpc"],
            metrics={"f1": 0.8, "mcc": 0.8},
            base_metrics={"f1": 0.5, "mcc": 0.5},
            eval_datasets={
                "cola": {"mcc": 0.8 if target == "cola" else 0.4},
                "mrpc": {"f1": 0.8 if target == "mrpc" else 0.4},
            },
            base_eval_datasets={"cola": {"mcc": 0.5}, "mrpc": {"f1": 0.5}},
        )
    report(tmp_path, out=tmp_path / "r")
    rows = md_table((tmp_path / "r" / "mysweep_forgetting.md").read_text())
    assert rows[0][3] == "mrpc (gain vs Original where trained on it, else Δ)"
    by_target = {r[1]: r[3:] for r in rows[1:]}
    assert by_target == {
        "mrpc": ["+30.00 (80.00)", "40.00 (-10.00)"],
        "cola": ["40.00 (-10.00)", "+30.00 (80.00)"],
    }
