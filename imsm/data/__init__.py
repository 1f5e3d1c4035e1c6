"""Datasets: raw files -> ``Example`` (one module each), tokenisation and collation.

Each ``conf/dataset/<name>.yaml`` names its loader (``loader._target_``: a module's ``load`` function), its
``source`` (``raw`` | ``reference`` | ``hub``), its template and its metric; ``load_split`` calls that loader for one
split and applies a sample limit. ``dataset_config`` reads one of those files by name (evaluation on many datasets).
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from imsm.data.base import SOURCES, DataError, Example, check_source

DATASET_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "dataset"


def load_split(
    dataset_cfg: DictConfig, data_dir: str | None, split: str, limit: int | None = None
) -> list[Example]:
    """Examples of ``split`` from the dataset described by ``dataset_cfg`` (first ``limit`` when set)."""
    source = dataset_cfg.get("source") or "raw"
    check_source(dataset_cfg.get("name", "dataset"), source)
    if not split:
        raise DataError(
            f"{dataset_cfg.get('name')}: no split given (is train_split/eval_split null in its config?)"
        )
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
        on_bad_row=dataset_cfg.get("on_bad_row") or "error",
    )
    return examples[:limit] if limit else examples


def dataset_names(conf_dir: Path = DATASET_CONF_DIR) -> list[str]:
    return sorted(p.stem for p in conf_dir.glob("*.yaml"))


def dataset_config(name: str, conf_dir: Path = DATASET_CONF_DIR) -> DictConfig:
    """``conf/dataset/<name>.yaml``; an unknown name lists the choices."""
    path = conf_dir / f"{name}.yaml"
    if not path.exists():
        raise DataError(f"unknown dataset {name!r}; choices: {dataset_names(conf_dir)} (files in {conf_dir})")
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    return cfg


__all__ = ["SOURCES", "DataError", "Example", "dataset_config", "dataset_names", "load_split"]
