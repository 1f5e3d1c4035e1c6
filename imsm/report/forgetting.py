"""The forgetting experiment's analysis (``scripts/forgetting_cpu.sh``; the design: docs/results-forgetting-cpu-design.md).

``python -m imsm.report.forgetting ROOT --docs docs`` reads the runs under ``ROOT/{vanilla,imsm,fixed,fast}`` (each
a Hydra multirun of ``experiment=forgetting_cpu``), computes what the design names, and writes
``docs/results-forgetting-cpu.md`` (a generated header, the design, the tables, the reading if
``docs/results-forgetting-cpu-reading.md`` exists) and ``docs/results-forgetting-cpu/``: ``summary.json`` (every
number of the tables), ``per_question.csv`` (each evaluated model's per-question NLLs), the figures, and each run's
``metrics.json`` files.

A *point* is one evaluated model: a run at its end, or vanilla after step 20 (``eval.at_steps``). Its forgetting is
ΔNLL averaged over the WebQ + FreebaseQA questions (equal weight per question); its fit to the target is the MRPC
gold-label NLL. Contrasts are paired by seed; the unit of replication is the seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imsm.io import write_json
from imsm.metrics import bootstrap_ci
from imsm.record import is_record
from imsm.report.plots import _pyplot, write_figure
from imsm.report.stats import holm

ARMS = {
    "vanilla": "vanilla LoRA",
    "imsm": "IMSM",
    "fixed": "IMSM w/o gate (0.5 mix)",
    "fast": "IMSM, fast gate",
}
QA, TARGET = ("webq", "freebaseqa"), "mrpc"
FINAL, MATCH_STEP = 40, 20  # vanilla's curve: step 0 (the frozen model), MATCH_STEP, the end
DOC, DESIGN, READING, FILES = (
    "results-forgetting-cpu.md",
    "results-forgetting-cpu-design.md",
    "results-forgetting-cpu-reading.md",
    "results-forgetting-cpu",
)


@dataclass
class Point:
    """One evaluated model: per-question rows of the QA sets and the target, and each dataset's metrics."""

    arm: str
    seed: int
    step: int | None  # None: the end of training
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def qa(self) -> list[dict[str, Any]]:
        return [r for name in QA for r in self.rows.get(name, [])]

    @property
    def forgetting(self) -> float:
        """ΔNLL, nats per answer token, mean over the QA questions."""
        return statistics.fmean(r["delta_nll"] for r in self.qa)

    @property
    def target_nll(self) -> float:
        return statistics.fmean(r["nll"] for r in self.rows[TARGET])

    @property
    def frozen_target_nll(self) -> float:
        return statistics.fmean(r["nll_frozen"] for r in self.rows[TARGET])

    def mean(self, key: str, datasets: tuple[str, ...] = QA) -> float | None:
        values = [r[key] for name in datasets for r in self.rows.get(name, []) if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    def metric(self, dataset: str, *path: str) -> float | None:
        node: Any = self.metrics.get(dataset, {})
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, int | float) else None


def read_point(eval_dir: Path, arm: str, seed: int, step: int | None) -> Point:
    """``eval_dir/<name>/{metrics.json, predictions.jsonl}`` of the target and the QA sets."""
    point = Point(arm, seed, step)
    for name in (TARGET, *QA):
        d = eval_dir / name
        if not (d / "metrics.json").exists():
            raise FileNotFoundError(f"{d / 'metrics.json'}: missing (was the run evaluated on {name}?)")
        point.metrics[name] = json.loads((d / "metrics.json").read_text())["metrics"]
        with open(d / "predictions.jsonl") as f:
            point.rows[name] = [json.loads(line) for line in f if line.strip()]
    return point


def find_runs(root: Path) -> tuple[dict[str, dict[int, Path]], list[str]]:
    """``{arm: {seed: run_dir}}`` of the finished runs under ``root/<arm>`` (symlinks followed), and the failures."""
    runs: dict[str, dict[int, Path]] = {arm: {} for arm in ARMS}
    failed = []
    for arm in ARMS:
        for dirpath, _, files in sorted(os.walk(root / arm, followlinks=True)):
            if "metrics.json" not in files or Path(dirpath).parent.name in ("eval", "eval_base"):
                continue
            record = json.loads((Path(dirpath) / "metrics.json").read_text())
            if not is_record(record):
                continue
            if record["status"] != "ok":
                failed.append(f"{arm} seed {record.get('seed')}: {record.get('error')}")
                continue
            if record["seed"] in runs[arm]:
                raise ValueError(
                    f"{arm}: two runs of seed {record['seed']} ({runs[arm][record['seed']]}, {dirpath})"
                )
            runs[arm][record["seed"]] = Path(dirpath)
    return runs, failed


# --- statistics -----------------------------------------------------------------------------------------------------


def t_summary(diffs: list[float]) -> dict[str, Any]:
    """Mean of seed-paired differences, its 95% t-interval and the two-sided one-sample t-test's p (n >= 2)."""
    from scipy import stats

    n = len(diffs)
    out: dict[str, Any] = {"n": n, "mean": statistics.fmean(diffs) if diffs else None}
    if n < 2:
        return {**out, "sd": None, "ci": None, "p": None}
    sd = statistics.stdev(diffs)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if sd > 0 else None
    return {**out, "sd": sd, "ci": [out["mean"] - half, out["mean"] + half], "p": p}


def mde_sd(n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Minimum detectable effect of a two-sided paired t-test with ``n`` pairs, in SDs of the differences.

    Power is integrated over the chi-square law of the sample variance (scipy's noncentral t is unstable here)."""
    from scipy import integrate, optimize, stats

    if n < 2:
        return None
    df, crit = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)

    def power_at(d: float) -> float:
        nc = d * math.sqrt(n)

        def integrand(v: float) -> float:  # P(reject | sample variance v) x the density of v
            critical = crit * math.sqrt(v / df)
            return stats.chi2.pdf(v, df) * (stats.norm.sf(critical - nc) + stats.norm.cdf(-critical - nc))

        return integrate.quad(integrand, 0, math.inf, limit=200)[0]

    return float(optimize.brentq(lambda d: power_at(d) - power, 1e-3, 50))


def on_curve(curve: list[tuple[float, float]], x: float) -> float | None:
    """Vanilla's ΔNLL at target NLL ``x``, linear between consecutive curve points (in step order); None outside."""
    for (xa, ya), (xb, yb) in zip(curve, curve[1:], strict=False):
        if min(xa, xb) <= x <= max(xa, xb):
            return ya if xa == xb else ya + (x - xa) * (yb - ya) / (xb - xa)
    return None


# --- analysis -------------------------------------------------------------------------------------------------------


def analyse(root: Path) -> dict[str, Any]:
    runs, failed = find_runs(root)
    points = {
        arm: {s: read_point(d / "eval", arm, s, None) for s, d in sorted(seeds.items())}
        for arm, seeds in runs.items()
    }
    early = {
        s: read_point(d / "eval_steps" / f"step-{MATCH_STEP}", "vanilla", s, MATCH_STEP)
        for s, d in sorted(runs["vanilla"].items())
        if (d / "eval_steps" / f"step-{MATCH_STEP}").is_dir()
    }
    vanilla = points["vanilla"]
    if not vanilla:
        raise ValueError(f"{root}: no finished vanilla run under {root / 'vanilla'}")
    any_point = next(iter(vanilla.values()))
    frozen = {
        "target_nll": any_point.frozen_target_nll,
        "p_eos_first": any_point.mean("p_eos_first_frozen"),
        "base": _frozen_metrics(runs),
    }
    summary: dict[str, Any] = {
        "root": str(root),
        "failed": failed,
        "frozen": frozen,
        "arms": {},
        "points": [],
    }
    for arm, by_seed in [*points.items(), ("vanilla@20", early)]:
        summary["arms"][arm] = _arm_summary(by_seed)
        for p in by_seed.values():
            summary["points"].append(_point_summary(p, arm))

    # 1. precondition: vanilla forgets in every seed, each seed's bootstrap CI above 0
    cis = {s: bootstrap_ci([r["delta_nll"] for r in p.qa]) for s, p in vanilla.items()}
    summary["precondition"] = {
        "per_seed": cis,
        "met": all(c["ci"][0] > 0 for c in cis.values()),
    }
    # 2. contrasts paired by seed, Holm over the family; 3. matched plasticity
    curves = {
        s: [(frozen["target_nll"], 0.0)]
        + ([(early[s].target_nll, early[s].forgetting)] if s in early else [])
        + [(p.target_nll, p.forgetting)]
        for s, p in vanilla.items()
    }
    contrasts, matched = {}, {}
    for arm in ("imsm", "fixed", "fast"):
        seeds = sorted(set(points[arm]) & set(vanilla))
        if not seeds:
            continue
        diffs = [points[arm][s].forgetting - vanilla[s].forgetting for s in seeds]
        c = t_summary(diffs)
        base = statistics.fmean(vanilla[s].forgetting for s in seeds)
        c["recovered"] = -c["mean"] / base if base > 0 else None  # no forgetting: nothing to recover
        c["seeds"] = seeds
        c["mde_sd"] = mde_sd(len(seeds))
        c["mde"] = c["mde_sd"] * c["sd"] if c["mde_sd"] is not None and c["sd"] is not None else None
        c["target_nll_diff"] = t_summary([points[arm][s].target_nll - vanilla[s].target_nll for s in seeds])
        contrasts[arm] = c
        on = {s: on_curve(curves[s], points[arm][s].target_nll) for s in seeds}
        inside = [s for s in seeds if on[s] is not None]
        m = t_summary([points[arm][s].forgetting - on[s] for s in inside])  # type: ignore[operator]
        m["seeds"], m["outside"] = inside, [s for s in seeds if on[s] is None]
        m["mde_sd"] = mde_sd(len(inside))
        matched[arm] = m
    for arm, p_adj in zip(contrasts, holm([c["p"] for c in contrasts.values()]), strict=True):
        contrasts[arm]["p_holm"] = p_adj
    summary["contrasts"], summary["matched"], summary["curves"] = contrasts, matched, curves
    summary["secondary"] = secondary_contrasts(points)
    summary["by_knowledge"] = by_knowledge({**points, "vanilla@20": early})
    summary["_points"] = {"final": points, "early": early}  # for the tables and figures; not written
    summary["_runs"] = runs
    return summary


# The design's secondary measures; their seed-paired tests were added after the run (the plan names the measures,
# not their tests), so the document labels them as such. Holm runs within each measure's family of arms.
SECONDARY: dict[str, Any] = {
    "p_eos_first": lambda p: p.mean("p_eos_first"),
    "kl": lambda p: p.mean("kl"),
    "contains": lambda p: _mean_or_none([p.metric(n, "accuracy") for n in QA]),
}


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)  # type: ignore[arg-type]


def secondary_contrasts(points: dict[str, dict[int, Point]]) -> dict[str, dict[str, Any]]:
    """Each secondary measure: arm - vanilla paired by seed (t-interval, p, Holm over the arms)."""
    out: dict[str, dict[str, Any]] = {}
    for measure, value in SECONDARY.items():
        family = {}
        for arm in ("imsm", "fixed", "fast"):
            pairs = [
                (value(points[arm][s]), value(points["vanilla"][s]))
                for s in sorted(set(points[arm]) & set(points["vanilla"]))
            ]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            if pairs:
                family[arm] = {
                    **t_summary([a - b for a, b in pairs]),
                    "vanilla": statistics.fmean(b for _, b in pairs),
                }
        for arm, p_adj in zip(family, holm([c["p"] for c in family.values()]), strict=True):
            family[arm]["p_holm"] = p_adj
        out[measure] = family
    return out


def by_knowledge(points: dict[str, dict[int, Point]]) -> dict[str, Any]:
    """Exploratory: mean ΔNLL over the questions in each third of the frozen model's NLL (best known first).

    The thirds are cut on the frozen NLLs of the first vanilla point; every point is split at the same cuts."""
    first = next(iter(points["vanilla"].values()), None)
    if first is None:
        return {}
    import numpy as np

    cuts = np.quantile([r["nll_frozen"] for r in first.qa], [1 / 3, 2 / 3]).tolist()
    out: dict[str, Any] = {"cuts": cuts, "arms": {}}
    for arm, by_seed in points.items():
        if not by_seed:
            continue
        per_seed = []
        for p in by_seed.values():
            thirds: list[list[float]] = [[], [], []]
            for r in p.qa:
                thirds[sum(r["nll_frozen"] > c for c in cuts)].append(r["delta_nll"])
            per_seed.append([statistics.fmean(t) if t else float("nan") for t in thirds])
        out["arms"][arm] = [statistics.fmean(v[i] for v in per_seed) for i in range(3)]
    return out


def _frozen_metrics(runs: dict[str, dict[int, Path]]) -> dict[str, Any]:
    """The frozen model's own scores (``eval_base``) from the first run that has them: greedy accuracy, choice."""
    for seeds in runs.values():
        for d in seeds.values():
            base = d / "eval_base" / "metrics.json"
            if base.exists():
                return json.loads(base.read_text())
    return {}


def _point_summary(p: Point, arm: str) -> dict[str, Any]:
    return {
        "arm": arm,
        "seed": p.seed,
        "step": p.step or FINAL,
        "forgetting": p.forgetting,
        "forgetting_by_set": {n: statistics.fmean(r["delta_nll"] for r in p.rows[n]) for n in QA},
        "kl": p.mean("kl"),
        "p_eos_first": p.mean("p_eos_first"),
        "contains": {n: p.metric(n, "accuracy") for n in QA},
        "target_nll": p.target_nll,
        "auroc": p.metric(TARGET, "choice", "auroc"),
        "choice_accuracy": p.metric(TARGET, "choice", "accuracy"),
        "gate_qa": p.mean("gate_mean"),
        "gate_target": p.mean("gate_mean", (TARGET,)),
    }


def _arm_summary(by_seed: dict[int, Point]) -> dict[str, Any]:
    """Mean and SD over seeds of each point measure."""
    rows = [_point_summary(p, "") for p in by_seed.values()]
    keys = (
        "forgetting",
        "kl",
        "p_eos_first",
        "target_nll",
        "auroc",
        "choice_accuracy",
        "gate_qa",
        "gate_target",
    )
    out: dict[str, Any] = {"seeds": sorted(by_seed)}
    for k in keys:
        values = [r[k] for r in rows if r[k] is not None]
        out[k] = {
            "mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else None,
        }
    for n in QA:
        values = [r["forgetting_by_set"][n] for r in rows]
        out[f"forgetting_{n}"] = {"mean": statistics.fmean(values) if values else None}
        acc = [r["contains"][n] for r in rows if r["contains"][n] is not None]
        out[f"contains_{n}"] = {"mean": statistics.fmean(acc) if acc else None}
    return out


# --- rendering ------------------------------------------------------------------------------------------------------


def _f(v: float | None, digits: int = 3, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.{digits}f}"


def _ms(node: dict[str, Any], digits: int = 3, pct: bool = False) -> str:
    """``mean ± sd`` of an arm summary's entry."""
    m, sd = node.get("mean"), node.get("sd")
    return _f(m, digits, pct) + ("" if sd is None else f" ± {_f(sd, digits, pct)}")


def _ci(c: dict[str, Any], digits: int = 3) -> str:
    return "-" if not c.get("ci") else f"[{_f(c['ci'][0], digits)}, {_f(c['ci'][1], digits)}]"


def _p(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def tables(summary: dict[str, Any]) -> str:
    arms, frozen = summary["arms"], summary["frozen"]
    base = frozen["base"]
    names = {**ARMS, "vanilla@20": f"vanilla LoRA after step {MATCH_STEP}"}
    out = ["### Every arm (mean ± SD over seeds)", ""]
    out.append(
        "| arm | seeds | ΔNLL QA (nats/token) | ΔNLL WebQ | ΔNLL FreebaseQA | KL | P(EOS first) | contains WebQ % "
        "| contains FreebaseQA % | MRPC NLL | MRPC AUROC | MRPC choice acc % | g on QA | g on MRPC |"
    )
    out.append("|" + "---|" * 14)
    contains_base = {n: (base.get(n) or {}).get("accuracy") for n in QA}
    choice_base = (base.get(TARGET) or {}).get("choice") or {}
    out.append(
        f"| frozen model | - | 0 | 0 | 0 | 0 | {_f(frozen['p_eos_first'])} | {_f(contains_base['webq'], pct=True)} "
        f"| {_f(contains_base['freebaseqa'], pct=True)} | {_f(frozen['target_nll'])} | {_f(choice_base.get('auroc'))} "
        f"| {_f(choice_base.get('accuracy'), pct=True)} | - | - |"
    )
    for arm, a in arms.items():
        if not a["seeds"]:
            continue
        out.append(
            f"| {names[arm]} | {','.join(map(str, a['seeds']))} | {_ms(a['forgetting'])} "
            f"| {_f(a['forgetting_webq']['mean'])} | {_f(a['forgetting_freebaseqa']['mean'])} | {_ms(a['kl'])} "
            f"| {_ms(a['p_eos_first'])} | {_f(a['contains_webq']['mean'], pct=True)} "
            f"| {_f(a['contains_freebaseqa']['mean'], pct=True)} | {_ms(a['target_nll'])} | {_ms(a['auroc'])} "
            f"| {_ms(a['choice_accuracy'], pct=True)} | {_ms(a['gate_qa'])} | {_ms(a['gate_target'])} |"
        )
    out += [
        "",
        "ΔNLL: gold-answer NLL minus the frozen model's, per answer token, mean over the 500 WebQ + 500",
        "FreebaseQA questions (> 0: forgotten). KL(frozen ‖ model) per answer token. contains: greedy answers (the",
        "vanilla and IMSM arms and the frozen model only). g: the frozen stream's weight, mean over features and answer",
        "positions (IMSM arms).",
        "",
    ]

    pre = summary["precondition"]
    out += [
        "### 1. Precondition: does vanilla forget? (each seed, 95% bootstrap CI over the 1,000 questions)",
        "",
    ]
    out += ["| seed | vanilla ΔNLL | 95% CI |", "|---|---|---|"]
    for s, c in pre["per_seed"].items():
        out.append(f"| {s} | {_f(c['mean'])} | {_ci(c)} |")
    out += ["", f"Precondition met (every seed's CI above 0): **{'yes' if pre['met'] else 'no'}**.", ""]

    out += ["### 2. Each arm minus vanilla, paired by seed (ΔNLL, nats per answer token)", ""]
    out += [
        "| arm | seeds | difference | 95% t-interval | p | p (Holm, 3 tests) | vanilla's forgetting recovered "
        "| MDE (80% power) | MRPC NLL difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, c in summary["contrasts"].items():
        mde = "-" if c["mde"] is None else f"{c['mde']:.3f} ({c['mde_sd']:.2f} SD)"
        out.append(
            f"| {ARMS[arm]} | {len(c['seeds'])} | {_f(c['mean'])} | {_ci(c)} | {_p(c['p'])} | {_p(c.get('p_holm'))} "
            f"| {_f(c['recovered'], pct=True)}{'%' if c['recovered'] is not None else ''} | {mde} | {_f(c['target_nll_diff']['mean'])} |"
        )
    out += [
        "",
        "Negative difference: the arm forgot less than vanilla on the same seed. MRPC NLL difference > 0: the",
        "arm fits the target less well than vanilla.",
        "",
    ]

    out += [
        f"### 3. At matched fit: ΔNLL minus vanilla's curve (frozen -> step {MATCH_STEP} -> step {FINAL}) at the "
        "arm's MRPC NLL, same seed",
        "",
    ]
    out += [
        "| arm | seeds on the curve | outside (fits MRPC better than vanilla's end, or worse than the frozen model) "
        "| matched difference | 95% t-interval | p |",
        "|---|---|---|---|---|---|",
    ]
    for arm, m in summary["matched"].items():
        out.append(
            f"| {ARMS[arm]} | {','.join(map(str, m['seeds'])) or '-'} | {','.join(map(str, m['outside'])) or '-'} "
            f"| {_f(m['mean'])} | {_ci(m)} | {_p(m['p'])} |"
        )
    out += _secondary_tables(summary)
    out += [
        "",
        "![fit vs forgetting](results-forgetting-cpu/fit_vs_forgetting.png)",
        "",
        "![gate values](results-forgetting-cpu/gate.png)",
        "",
    ]
    if summary["failed"]:
        out += ["### Failed runs", "", *[f"- {f}" for f in summary["failed"]], ""]
    return "\n".join(out)


def _secondary_tables(summary: dict[str, Any]) -> list[str]:
    names = {
        "p_eos_first": "P(EOS first)",
        "kl": "KL(frozen ‖ model)",
        "contains": "greedy contains (WebQ + FreebaseQA mean)",
    }
    out = [
        "",
        "### 4. Secondary measures, each arm minus vanilla, paired by seed",
        "",
        "The design names these measures but not their tests; these seed-paired t-tests (Holm over the arms of each",
        "measure) were added after the run, when the precondition's outcome was known.",
        "",
        "| measure | arm | seeds | vanilla | difference | 95% t-interval | p | p (Holm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for measure, family in summary["secondary"].items():
        for arm, c in family.items():
            out.append(
                f"| {names[measure]} | {ARMS[arm]} | {c['n']} | {_f(c['vanilla'])} | {_f(c['mean'])} | {_ci(c)} "
                f"| {_p(c['p'])} | {_p(c.get('p_holm'))} |"
            )
    k = summary.get("by_knowledge") or {}
    if k:
        labels = {**ARMS, "vanilla@20": f"vanilla LoRA after step {MATCH_STEP}"}
        out += [
            "",
            "### 5. Exploratory (not pre-registered): ΔNLL by how well the frozen model knew the answer",
            "",
            f"Questions split into thirds by the frozen model's NLL of the gold answer (cuts {k['cuts'][0]:.2f} and "
            f"{k['cuts'][1]:.2f} nats/token); mean ΔNLL per third, averaged over seeds.",
            "",
            "| arm | best-known third | middle third | least-known third |",
            "|---|---|---|---|",
        ]
        for arm, thirds in k["arms"].items():
            out.append(f"| {labels[arm]} | {' | '.join(_f(t) for t in thirds)} |")
    return out


def figures(summary: dict[str, Any], out_dir: Path) -> None:
    plt = _pyplot()
    final, early = summary["_points"]["final"], summary["_points"]["early"]
    # left: the whole curve from the frozen model; right: zoomed on the trained models (the frozen model's MRPC NLL
    # is far out: it rarely answers yes/no at all)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    trained = [p.target_nll for by_seed in (*final.values(), early) for p in by_seed.values()]
    colors = {"vanilla": "black", "imsm": "tab:blue", "fixed": "tab:orange", "fast": "tab:green"}
    for ax in axes:
        for s, curve in summary["curves"].items():
            xs, ys = zip(*curve, strict=True)
            label = (
                f"vanilla: frozen, step {MATCH_STEP}, step {FINAL}" if s == min(summary["curves"]) else None
            )
            ax.plot(xs, ys, "-o", color="grey", alpha=0.6, ms=3, label=label)
        for arm, by_seed in final.items():
            if by_seed:
                points = list(by_seed.values())
                ax.scatter(
                    [p.target_nll for p in points],
                    [p.forgetting for p in points],
                    color=colors[arm],
                    label=ARMS[arm],
                    zorder=3,
                )
        if early:
            points = list(early.values())
            ax.scatter(
                [p.target_nll for p in points],
                [p.forgetting for p in points],
                marker="x",
                color="black",
                label=f"vanilla after step {MATCH_STEP}",
                zorder=3,
            )
        ax.set_xlabel("MRPC gold-label NLL (nats/token; lower = fits the target better)")
        ax.axhline(0.0, color="grey", lw=0.6, ls=":")
    if trained:
        pad = 0.1 * (max(trained) - min(trained)) + 0.01
        axes[1].set_xlim(max(trained) + pad, min(trained) - pad)
    axes[0].invert_xaxis()
    axes[0].set_ylabel("ΔNLL on WebQ + FreebaseQA (nats/token; higher = forgot more)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("Target fit vs forgetting, one point per seed")
    axes[1].set_title("the trained models, zoomed")
    write_figure(fig, out_dir / "fit_vs_forgetting.png")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels, qa, tgt = [], [], []
    for arm in ("imsm", "fast"):
        for s, p in final[arm].items():
            labels.append(f"{arm} s{s}")
            qa.append(p.mean("gate_mean") or 0.0)
            tgt.append(p.mean("gate_mean", (TARGET,)) or 0.0)
    xs = range(len(labels))
    ax.plot([x - 0.1 for x in xs], qa, "o", label="QA prompts (WebQ + FreebaseQA)")
    ax.plot([x + 0.1 for x in xs], tgt, "s", label="MRPC prompts")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xticks(list(xs), labels, rotation=30, fontsize=8)
    ax.set_ylabel("mean g (frozen stream's weight)")
    values = [*qa, *tgt, 0.5]
    ax.set_ylim(min(0.4, min(values) - 0.02), max(0.6, max(values) + 0.02))  # g stays near 0.5: zoom in
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    write_figure(fig, out_dir / "gate.png")


def write_files(summary: dict[str, Any], root: Path, out_dir: Path) -> None:
    """summary.json, per_question.csv and each run's metrics.json files under ``out_dir/runs/<arm>/s<seed>/``."""
    points = summary["_points"]
    write_json(out_dir / "summary.json", {k: v for k, v in summary.items() if not k.startswith("_")})
    with open(out_dir / "per_question.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["arm", "seed", "step", "dataset", "index", "nll", "nll_frozen", "delta_nll", "kl", "gate_mean"]
        )
        for kind in ("final", "early"):
            by_arm = points[kind] if kind == "final" else {"vanilla": points["early"]}
            for arm, by_seed in by_arm.items():
                for s, p in by_seed.items():
                    for name, rows in p.rows.items():
                        for i, r in enumerate(rows):
                            w.writerow(
                                [
                                    arm,
                                    s,
                                    p.step or FINAL,
                                    name,
                                    i,
                                    f"{r['nll']:.5f}",
                                    f"{r['nll_frozen']:.5f}",
                                    f"{r['delta_nll']:.5f}",
                                    f"{r['kl']:.5f}",
                                    _f(r.get("gate_mean"), 5),
                                ]
                            )
    for arm, seeds in summary["_runs"].items():
        for s, d in seeds.items():
            for src in [d / "metrics.json", *sorted(d.glob("eval*/**/metrics.json"))]:
                dst = out_dir / "runs" / arm / f"s{s}" / src.relative_to(d)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
    for name in ("stages.md", "select.md", "fast_gate_lr.txt"):
        if (root / name).exists():
            shutil.copyfile(root / name, out_dir / name)


def document(summary: dict[str, Any], root: Path, docs: Path) -> str:
    import torch
    import transformers

    stages = (root / "stages.md").read_text() if (root / "stages.md").exists() else ""
    total = sum(int(line.rsplit("|", 2)[1]) for line in stages.splitlines() if line.startswith("|"))
    select = (root / "select.md").read_text() if (root / "select.md").exists() else ""
    chosen = (root / "fast_gate_lr.txt").read_text().strip() if (root / "fast_gate_lr.txt").exists() else "-"
    parts = [
        "# Does the gate keep what the model knew? SmolLM2-135M-Instruct, LoRA, MRPC (CPU)",
        "",
        f"Generated by `scripts/forgetting_cpu.sh` on {datetime.now(UTC):%Y-%m-%d} from `{root}`; every table is",
        "`python -m imsm.report.forgetting`'s output, unedited, and every number is in",
        f"[{FILES}/summary.json]({FILES}/summary.json); each run's metrics.json files are in [{FILES}/runs/]({FILES}/runs/).",
        "",
        f"- Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU; torch {torch.__version__}, "
        f"transformers {transformers.__version__}.",
        f"- Wall time: {total} s ({total / 60:.1f} min) for the training jobs and their evaluations:",
        "",
        "| stage | command (plus `hydra.sweep.dir`, `eval.original_cache`) | seconds |",
        "|---|---|---|",
        stages.rstrip(),
        "",
    ]
    if select:
        parts += [
            f"Fast-gate learning rate: **{chosen}** (held-out |mean g − 0.5|, the larger of MRPC dev[:200] and "
            "WebQ train[:200]):",
            "",
            "| gate lr | moved |",
            "|---|---|",
            select.rstrip(),
            "",
        ]
    design = docs / DESIGN
    if design.exists():
        parts += [design.read_text().rstrip(), ""]
    parts += ["## Results", "", tables(summary)]
    reading = docs / READING
    if reading.exists():
        parts += ["", reading.read_text().rstrip()]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "root", type=Path, help="the script's output directory (multirun/forgetting_cpu/<time>)"
    )
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="where the document and its files go")
    args = parser.parse_args(argv)
    summary = analyse(args.root)
    out_dir = args.docs / FILES
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    write_files(summary, args.root, out_dir)
    figures(summary, out_dir)
    (args.docs / DOC).write_text(document(summary, args.root, args.docs))
    print(tables(summary))


if __name__ == "__main__":
    main()
