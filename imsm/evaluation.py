"""The evaluation stage: one settings object in, every dataset scored the same way, one output layout.

``EvalSettings`` says what to evaluate (the target, the forgetting sets), how (scorer, batch, lengths, autocast), and
whether to also score the frozen backbone (the paper's "Original" row, optionally cached across a sweep). It is built
from the run config before any training (``EvalSettings.from_train_config``), so a misspelt dataset name, split or
scorer fails in seconds rather than after hours of training.

Scoring is a registry: ``SCORERS[name](model, tokenizer, examples, dataset, settings, streams, desc)`` returns
``(metrics, per-example rows)``. A new way of scoring is one function added there plus its name in ``eval.scoring``:
``generate`` (greedy text scored by the dataset's metric), ``likelihood`` (teacher-forced gold-answer NLL, KL to the
frozen model, choice scoring of yes/no sets, gate values: ``imsm.likelihood``), or ``both``.

Layout, for every dataset alike: ``<out>/<name>/metrics.json`` (metrics + how they were obtained) and
``<out>/<name>/predictions.jsonl``, plus ``<out>/metrics.json`` (``{name: metrics}``). A training run uses
``<run_dir>/eval`` for the model and ``<run_dir>/eval_base`` for the frozen backbone.

Malformed rows: a set is loaded with ``on_bad_row=skip`` when its own config says so (``dataset.on_bad_row`` for the
target, ``conf/dataset/<name>.yaml`` for the others) or when ``eval.on_bad_row`` (``on_bad_row`` of
``imsm.evaluate``) is ``skip``; otherwise a malformed row is an error. The rows skipped are counted per split:
``skipped_rows`` in each ``<out>/<name>/metrics.json`` and ``EvalResult.skipped_rows``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase, TrainerCallback

from imsm.backbones import DTYPES
from imsm.data import DataError, check_source, dataset_config, load_split, parse_split
from imsm.data.base import BAD_ROW_POLICIES, Example, Examples
from imsm.io import write_json, write_jsonl
from imsm.likelihood import ALIAS_RULES, likelihood_scores
from imsm.model.siamese import STREAMS, IMSMModel
from imsm.predict import evaluate_examples
from imsm.record import flat_metrics

log = logging.getLogger(__name__)

MODEL_DIR, BASE_DIR, STEPS_DIR = "eval", "eval_base", "eval_steps"


@dataclass(frozen=True)
class DatasetEval:
    """One dataset to score: its config node (``conf/dataset/<name>.yaml``, with overrides), first ``limit`` rows."""

    name: str
    config: DictConfig
    limit: int | None
    max_new_tokens: int
    scoring: str | None = (
        None  # this dataset's scorer (``eval.scoring_by_dataset``); None: ``EvalSettings.scoring``
    )


@dataclass
class EvalSettings:
    """Everything the evaluation stage needs; nothing else is read from the run config."""

    datasets: list[DatasetEval]
    data_dir: str | None
    batch_size: int = 8
    max_input_length: int = 512
    max_output_length: int = 512  # likelihood scoring: gold-answer tokens (incl. EOS), as in training
    chat_template: bool = False
    autocast: str | None = None
    scoring: str = "generate"
    aliases: str = "first"  # likelihood scoring of several gold aliases: first | best (imsm.likelihood)
    answer_eos: bool = True  # likelihood scoring: the answer's NLL includes its closing EOS (as in training)
    compare_base: bool = False
    original_cache: str | None = None
    on_bad_row: str = "error"  # skip: skip malformed rows in every set (error: each set's own on_bad_row)
    backbone: dict[str, Any] = field(
        default_factory=dict
    )  # the frozen backbone's config: the cache key's part

    def __post_init__(self) -> None:
        if self.scoring not in SCORERS:
            raise ValueError(f"eval.scoring={self.scoring!r} is not one of {sorted(SCORERS)}")
        if self.aliases not in ALIAS_RULES:
            raise ValueError(f"eval.aliases={self.aliases!r} is not one of {list(ALIAS_RULES)}")
        if self.autocast not in (None, *DTYPES):
            raise ValueError(f"autocast={self.autocast!r} is not one of [null, {', '.join(DTYPES)}]")
        if self.on_bad_row not in BAD_ROW_POLICIES:
            raise ValueError(f"eval.on_bad_row={self.on_bad_row!r} is not one of {list(BAD_ROW_POLICIES)}")
        for ds in self.datasets:
            own = ds.config.get("on_bad_row") or "error"
            if own not in BAD_ROW_POLICIES:
                raise DataError(
                    f"{ds.name}: on_bad_row={own!r} (conf/dataset/{ds.name}.yaml or dataset.on_bad_row) is not "
                    f"one of {list(BAD_ROW_POLICIES)}"
                )
            if ds.scoring is not None and ds.scoring not in SCORERS:
                raise ValueError(
                    f"eval.scoring_by_dataset.{ds.name}={ds.scoring!r} is not one of {sorted(SCORERS)}"
                )
            split = ds.config.get("eval_split")
            if not split:
                raise DataError(f"{ds.name}: no eval_split in its config")
            parse_split(split)
            check_source(ds.name, ds.config.get("source") or "raw")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"a dataset is listed twice for evaluation: {names}")

    def scoring_of(self, ds: DatasetEval) -> str:
        """The scorer of ``ds``: its own (``eval.scoring_by_dataset``) or the settings' ``scoring``."""
        return ds.scoring or self.scoring

    def on_bad_row_of(self, ds: DatasetEval) -> str:
        """``skip`` if ``ds``'s own config or ``eval.on_bad_row`` says so, else ``error``."""
        return "skip" if "skip" in (self.on_bad_row, ds.config.get("on_bad_row")) else "error"

    @classmethod
    def from_train_config(cls, cfg: DictConfig) -> EvalSettings:
        """The target (``cfg.dataset``, as overridden) then ``cfg.eval_datasets``; limits from ``eval.limits``.

        ``eval.max_new_tokens`` applies to the target only (the forgetting sets keep their own). A forgetting set that
        is the target itself is scored once, as the target.
        """
        ev = cfg.eval
        limits = ev.get("limits") or {}
        scorers = ev.get("scoring_by_dataset") or {}

        def entry(name: str, node: DictConfig, max_new_tokens: int | None = None) -> DatasetEval:
            limit = limits.get(name, cfg.max_eval_samples)
            return DatasetEval(
                name, node, limit, int(max_new_tokens or node.max_new_tokens), scorers.get(name)
            )

        target = entry(cfg.dataset.name, cfg.dataset, ev.max_new_tokens)
        others = [entry(n, dataset_config(n)) for n in (cfg.eval_datasets or []) if n != target.name]
        unknown = sorted(set(scorers) - {target.name, *(d.name for d in others)})
        if unknown:
            raise ValueError(
                f"eval.scoring_by_dataset names {unknown}, which are not evaluated "
                f"(the target {target.name!r} and eval_datasets {list(cfg.eval_datasets or [])})"
            )
        return cls(
            datasets=[target, *others],
            data_dir=cfg.data_dir,
            batch_size=int(ev.batch_size),
            max_input_length=int(cfg.max_input_length),
            max_output_length=int(cfg.max_output_length),
            chat_template=bool(cfg.chat_template),
            autocast=ev.get("autocast"),
            scoring=ev.get("scoring") or "generate",
            aliases=ev.get("aliases") or "first",
            answer_eos=bool(ev.get("answer_eos", True)),
            compare_base=bool(ev.compare_base),
            original_cache=ev.get("original_cache"),
            on_bad_row=ev.get("on_bad_row") or "error",
            backbone=OmegaConf.to_container(cfg.backbone, resolve=True),  # type: ignore[arg-type]
        )

    @classmethod
    def from_evaluate_config(cls, cfg: DictConfig) -> EvalSettings:
        """``python -m imsm.evaluate``: ``datasets`` (a name or a list), one ``limit``, optional ``source``."""
        names = [cfg.datasets] if isinstance(cfg.datasets, str) else list(cfg.datasets)
        datasets = []
        for name in names:
            node = dataset_config(name)
            if cfg.get("source"):
                node.source = cfg.source
            if cfg.get("split"):  # e.g. a held-out slice of the training split: split='train[:200]'
                node.eval_split = cfg.split
            datasets.append(
                DatasetEval(name, node, cfg.limit, int(cfg.max_new_tokens or node.max_new_tokens))
            )
        return cls(
            datasets=datasets,
            data_dir=cfg.data_dir,
            batch_size=int(cfg.batch_size),
            max_input_length=int(cfg.max_input_length),
            max_output_length=int(cfg.get("max_output_length") or 512),
            chat_template=bool(cfg.chat_template),
            autocast=cfg.get("autocast"),
            scoring=cfg.get("scoring") or "generate",
            aliases=cfg.get("aliases") or "first",
            answer_eos=bool(cfg.get("answer_eos", True)),
            on_bad_row=cfg.get("on_bad_row") or "error",
        )


Scorer = Callable[..., tuple[dict[str, Any], list[dict[str, Any]]]]


def score_by_generation(
    model: IMSMModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    ds: DatasetEval,
    settings: EvalSettings,
    streams: str,
    desc: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy generation (both streams, KV-cached) scored by the dataset's metric."""
    return evaluate_examples(
        model,
        tokenizer,
        examples,
        ds.config.metric,
        max_new_tokens=ds.max_new_tokens,
        batch_size=settings.batch_size,
        max_input_length=settings.max_input_length,
        chat_template=settings.chat_template,
        streams=streams,
        desc=desc,
        autocast=settings.autocast,
    )


def score_by_likelihood(
    model: IMSMModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    ds: DatasetEval,
    settings: EvalSettings,
    streams: str,
    desc: str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Teacher-forced gold-answer likelihood under the model, its tuned stream and the frozen model
    (``imsm.likelihood``); yes/no datasets also get choice scoring."""
    return likelihood_scores(
        model,
        tokenizer,
        examples,
        streams=streams,
        choice=str(ds.config.metric).startswith("yes_no"),
        aliases=settings.aliases,
        with_eos=settings.answer_eos,
        batch_size=settings.batch_size,
        max_input_length=settings.max_input_length,
        max_output_length=settings.max_output_length,
        chat_template=settings.chat_template,
        autocast=settings.autocast,
        desc=desc,
    )


def score_by_both(*args: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generation and likelihood on the same examples: both metric sets, one row per example."""
    metrics, rows = score_by_generation(*args)
    lik_metrics, lik_rows = score_by_likelihood(*args)
    for row, extra in zip(rows, lik_rows, strict=True):
        row.update({k: v for k, v in extra.items() if k not in row})
    return {**metrics, **lik_metrics}, rows


SCORERS: dict[str, Scorer] = {
    "generate": score_by_generation,
    "likelihood": score_by_likelihood,
    "both": score_by_both,
}


def load_examples(ds: DatasetEval, settings: EvalSettings) -> Examples:
    """The examples ``ds`` is scored on (its ``eval_split``, first ``limit``); ``skipped``: malformed rows left out."""
    return load_split(
        ds.config, settings.data_dir, ds.config.eval_split, ds.limit, on_bad_row=settings.on_bad_row_of(ds)
    )


def score_dataset(
    model: IMSMModel,
    tokenizer: PreTrainedTokenizerBase,
    ds: DatasetEval,
    settings: EvalSettings,
    out_dir: Path,
    streams: str,
    examples: Examples | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load (unless ``examples`` are given), score and write one dataset: ``<out_dir>/<name>/{metrics.json,
    predictions.jsonl}``.

    Returns (metrics, per-example rows)."""
    if streams not in STREAMS:
        raise ValueError(f"streams={streams!r} is not one of {list(STREAMS)}")
    split = ds.config.eval_split
    examples = load_examples(ds, settings) if examples is None else examples
    start = time.perf_counter()
    scoring = settings.scoring_of(ds)
    scorer = SCORERS[scoring]
    metrics, rows = scorer(model, tokenizer, examples, ds, settings, streams, f"eval {ds.name} ({streams})")
    info = {
        "dataset": ds.name,
        "split": split,
        "source": ds.config.get("source") or "raw",
        "metric": ds.config.metric,
        "scoring": scoring,
        "streams": streams,
        "limit": ds.limit,
        "skipped_rows": getattr(examples, "skipped", 0),  # malformed rows left out (on_bad_row=skip)
        "autocast": settings.autocast,
        **({} if scoring == "generate" else {"answer_eos": settings.answer_eos}),
        "seconds": round(time.perf_counter() - start, 2),
        "metrics": metrics,
    }
    write_json(out_dir / ds.name / "metrics.json", info)
    write_jsonl(out_dir / ds.name / "predictions.jsonl", rows)
    return metrics, rows


def cached_original(settings: EvalSettings, ds: DatasetEval, compute: Callable[[], dict]) -> dict:
    """The frozen backbone's metrics on ``ds``, computed once per ``original_cache`` directory.

    Every job of a sweep would otherwise decode the same examples with the same frozen weights; the key holds
    everything the result depends on (backbone, dataset config, data, limit, decoding settings).
    """
    if not settings.original_cache:
        return compute()
    key = {
        "backbone": settings.backbone,
        "dataset": OmegaConf.to_container(ds.config, resolve=True),
        "data_dir": settings.data_dir,
        "limit": ds.limit,
        "max_new_tokens": ds.max_new_tokens,
        "autocast": settings.autocast,
        "batch_size": settings.batch_size,
        "max_input_length": settings.max_input_length,
        "chat_template": settings.chat_template,
    }
    if settings.on_bad_row == "skip":  # keeps the keys (and so the caches) of runs without it
        key["eval_on_bad_row"] = "skip"
    scoring = settings.scoring_of(ds)
    if scoring != "generate":  # keeps the keys (and so the caches) of earlier generation-only sweeps
        key["scoring"], key["aliases"] = scoring, settings.aliases
        if not settings.answer_eos:  # keeps the keys of earlier likelihood sweeps (all with EOS)
            key["answer_eos"] = False
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(settings.original_cache) / f"{settings.backbone.get('name')}_{ds.name}_{digest}.json"
    if path.exists():
        log.info("original %s: reusing %s", ds.name, path)
        return json.loads(path.read_text())["metrics"]
    metrics = compute()
    write_json(path, {"key": key, "metrics": metrics})
    return metrics


@dataclass
class EvalResult:
    """``{name: metrics}`` of the model and (with ``compare_base``) of the frozen backbone, in settings order;
    ``rows``: the model's per-example rows of each dataset; ``skipped_rows``: ``{"<name>/<eval_split>": n}``, the
    malformed rows left out of each split read (``on_bad_row=skip``; 0 included), as ``RunRecord.skipped_rows``."""

    model: dict[str, dict[str, Any]] = field(default_factory=dict)
    base: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0
    skipped_rows: dict[str, int] = field(default_factory=dict)


def evaluate_datasets(
    model: IMSMModel,
    tokenizer: PreTrainedTokenizerBase,
    settings: EvalSettings,
    out_dir: str | Path,
    streams: str = "imsm",
    base_dir: str | Path | None = None,
) -> EvalResult:
    """Score every dataset of ``settings`` with ``streams`` into ``out_dir``; then, with ``compare_base``, the frozen
    backbone into ``base_dir`` (default: ``eval_base`` beside ``out_dir``)."""
    out_dir, start = Path(out_dir), time.perf_counter()
    base_dir = Path(base_dir) if base_dir else out_dir.parent / BASE_DIR
    result = EvalResult()
    loaded: dict[str, Examples] = {}  # read once: the frozen backbone is scored on the same examples
    n = len(settings.datasets)
    for i, ds in enumerate(settings.datasets, start=1):
        log.info("[%d/%d] %s/%s: %s", i, n, ds.name, ds.config.eval_split, streams)
        loaded[ds.name] = load_examples(ds, settings)
        result.skipped_rows[f"{ds.name}/{ds.config.eval_split}"] = loaded[ds.name].skipped
        result.model[ds.name], result.rows[ds.name] = score_dataset(
            model, tokenizer, ds, settings, out_dir, streams, loaded[ds.name]
        )
    write_json(out_dir / "metrics.json", result.model)
    if settings.compare_base:
        for ds in settings.datasets:
            result.base[ds.name] = cached_original(
                settings,
                ds,
                lambda ds=ds: score_dataset(
                    model, tokenizer, ds, settings, base_dir, "base", loaded[ds.name]
                )[0],
            )
        write_json(base_dir / "metrics.json", result.base)
    result.seconds = time.perf_counter() - start
    return result


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """Datasets as rows, every metric that any of them reports as columns (``-`` where absent); likelihood, choice
    and gate sections as ``lik_*`` / ``choice_*`` / ``gate_*`` columns (``imsm.record.flat_metrics``)."""
    results = {name: flat_metrics(m) for name, m in results.items()}
    columns: list[str] = []
    for metrics in results.values():
        columns += [k for k in metrics if k not in columns]
    counts = [c for c in ("invalid", "invalid_rate", "n") if c in columns]  # counts after the scores
    columns = [c for c in columns if c not in counts] + counts
    width = max([len("dataset"), *map(len, results)]) + 2
    widths = [max(13, len(c) + 2) for c in columns]
    lines = [f"{'dataset':<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))]
    for name, metrics in results.items():
        cells = []
        for c in columns:
            v = metrics.get(c)
            cells.append("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append(f"{name:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    return "\n".join(lines)


class EvaluateAtSteps(TrainerCallback):
    """Likelihood scoring of every evaluation set after the given optimizer steps: a run's forgetting curve.

    Writes ``<out_dir>/step-<N>/<name>/{metrics.json, predictions.jsonl}``. Scoring runs in eval mode without
    gradients and draws no random numbers, so the training that follows is the one a run without it would do
    (tests/test_evaluation_steps.py). The main process scores; under DDP the other ranks wait at the next step.
    """

    def __init__(
        self,
        model: IMSMModel,
        tokenizer: PreTrainedTokenizerBase,
        settings: EvalSettings,
        steps: list[int],
        out_dir: str | Path,
        report: Callable[[int, EvalResult], None] | None = None,
    ):
        """``report(step, result)``: called with each step's scores (e.g. into the W&B run)."""
        bad = [s for s in steps if not isinstance(s, int) or isinstance(s, bool) or s < 1]
        if bad:
            raise ValueError(f"eval.at_steps must list optimizer steps >= 1; got {bad}")
        self.model, self.tokenizer, self.steps, self.out_dir = model, tokenizer, set(steps), Path(out_dir)
        self.report = report
        per_dataset_default = [replace(d, scoring=None) for d in settings.datasets]
        self.settings = replace(
            settings, datasets=per_dataset_default, scoring="likelihood", compare_base=False
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: D102
        if state.global_step not in self.steps or not state.is_world_process_zero:
            return
        was_training = self.model.training
        log.info("step %d: likelihood scoring of %d sets", state.global_step, len(self.settings.datasets))
        result = evaluate_datasets(
            self.model, self.tokenizer, self.settings, self.out_dir / f"step-{state.global_step}"
        )
        self.model.train(was_training)
        if self.report is not None:
            self.report(state.global_step, result)
