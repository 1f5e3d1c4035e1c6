"""Datasets: raw files -> ``Example`` (one module each), tokenisation and collation.

Each ``conf/dataset/<name>.yaml`` names its loader (``loader._target_``: a module's ``load`` function), its template
and its metric; ``load_split`` calls that loader for one split and applies a sample limit.
"""

from __future__ import annotations

from hydra.utils import get_method
from omegaconf import DictConfig

from imsm.data.base import DataError, Example


def load_split(
    dataset_cfg: DictConfig, data_dir: str | None, split: str, limit: int | None = None
) -> list[Example]:
    """Examples of ``split`` from the dataset described by ``dataset_cfg`` (first ``limit`` when set)."""
    # get_method + a plain call (not hydra.utils.instantiate) so DataError reaches the user unwrapped.
    loader = dict(dataset_cfg.loader)
    load = get_method(loader.pop("_target_"))
    examples = load(data_dir=data_dir, split=split, template=dataset_cfg.template, **loader)
    return examples[:limit] if limit else examples


__all__ = ["DataError", "Example", "load_split"]
