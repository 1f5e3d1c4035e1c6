"""Datasets: raw files -> ``Example`` (one module each, on the base in ``dataset.py``), tokenisation, collation.

Each ``conf/dataset/<name>.yaml`` names its loader (``loader._target_``: a module's ``load``, i.e. its ``Dataset``
subclass's), its ``source`` (``raw`` | ``reference`` | ``hub``), its template, its metric and its ``task_type``
(1 world-knowledge QA, 0 other: LoRAMoE's balancing constraint); ``load_split`` calls that loader for one split,
applies a sample limit and stamps each example with the task type; the examples come back as ``Examples``, whose
``skipped`` counts the malformed rows left out of the whole split's files (``on_bad_row=skip``; before any slice or
limit). A split may carry a Python slice, as in ``datasets``: ``train[:2000]``,
``train[-500:]`` (a validation slice held out of the training split). ``dataset_config`` reads one of those files by
name (evaluation on many datasets).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from imsm import CONF_DIR
from imsm.data.base import DataError, Example, Examples
from imsm.data.dataset import SOURCES, check_source, check_task_type

DATASET_CONF_DIR = CONF_DIR / "dataset"
_SLICED = re.compile(r"^(?P<name>[\w.-]+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def parse_split(split: str) -> tuple[str, slice]:
    """``"train[-500:]"`` -> ``("train", slice(-500, None))``; a plain name keeps every row."""
    if "[" not in split:
        return split, slice(None)
    m = _SLICED.match(split.strip())
    if not m:
        raise DataError(
            f"bad split {split!r}: expected a name or name[start:stop], e.g. train[:2000], train[-500:]"
        )
    start, stop = (int(v) if v else None for v in (m["start"], m["stop"]))
    return m["name"], slice(start, stop)


def load_split(
    dataset_cfg: DictConfig,
    data_dir: str | None,
    split: str,
    limit: int | None = None,
    on_bad_row: str | None = None,
) -> Examples:
    """Examples of ``split`` (optionally sliced: ``train[-500:]``) from ``dataset_cfg``; first ``limit`` when set.

    ``on_bad_row``: ``error`` | ``skip``; None: the config's own ``on_bad_row`` (default ``error``).
    """
    source = dataset_cfg.get("source") or "raw"
    check_source(dataset_cfg.get("name", "dataset"), source)
    if not split:
        raise DataError(
            f"{dataset_cfg.get('name')}: no split given (is train_split/eval_split null in its config?)"
        )
    split, rows = parse_split(split)
    options = OmegaConf.to_container(dataset_cfg.loader, resolve=True)
    assert isinstance(options, dict)
    # called directly rather than through hydra's instantiate, which would wrap a DataError in its own exception
    loader = get_method(options.pop("_target_"))
    examples = loader(
        **options,
        data_dir=data_dir,
        split=split,
        template=dataset_cfg.template,
        source=source,
        on_bad_row=on_bad_row or dataset_cfg.get("on_bad_row") or "error",
    )
    skipped = getattr(examples, "skipped", 0)  # a loader of another package may return a plain list
    examples = Examples(examples[rows][:limit] if limit else examples[rows], skipped)
    task_type = check_task_type(dataset_cfg.get("name", "dataset"), dataset_cfg.get("task_type"))
    if task_type is not None:  # a loader may set its own per-example type first (a mixture of tasks)
        for ex in examples:
            ex.meta.setdefault("task_type", task_type)
    return examples


def dataset_names(conf_dir: Path | None = None) -> list[str]:
    """The dataset configs: those Hydra finds (``--config-dir`` / search path included) inside a Hydra app."""
    loader = _hydra_loader() if conf_dir is None else None
    if loader is not None:
        return sorted(loader.get_group_options("dataset"))
    return sorted(p.stem for p in (conf_dir or DATASET_CONF_DIR).glob("*.yaml"))


def dataset_config(name: str, conf_dir: Path | None = None) -> DictConfig:
    """``conf/dataset/<name>.yaml`` (inside a Hydra app, wherever its search path finds it); an unknown name lists
    the choices."""
    loader = _hydra_loader() if conf_dir is None else None
    if loader is not None:
        found = loader.repository.load_config(f"dataset/{name}")
        if found is None:
            raise DataError(
                f"unknown dataset {name!r}; choices: {dataset_names()} (conf/dataset/ and --config-dir)"
            )
        return found.config
    conf_dir = conf_dir or DATASET_CONF_DIR
    path = conf_dir / f"{name}.yaml"
    if not path.exists():
        raise DataError(f"unknown dataset {name!r}; choices: {dataset_names(conf_dir)} (files in {conf_dir})")
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    return cfg


def _hydra_loader() -> Any | None:
    """The running Hydra app's config loader (it knows ``--config-dir`` and ``hydra.searchpath``), or None."""
    from hydra.core.global_hydra import GlobalHydra

    instance = GlobalHydra.instance()
    return instance.config_loader() if instance.is_initialized() else None


__all__ = [
    "SOURCES",
    "DataError",
    "Example",
    "Examples",
    "dataset_config",
    "dataset_names",
    "load_split",
    "parse_split",
]
