"""Names the report prints, read from the config files that define each choice, not from constants here.

``conf/peft/<name>.yaml`` and ``conf/dataset/<name>.yaml`` carry ``label:`` (``LoRA``, ``CoLA``); a dataset also
carries ``headline:``, the metric(s) its column shows (first present wins); ``conf/gate/<name>.yaml`` may carry
``label:`` (the suffix: ``+ IMSM``). A name without a file (a user's own method) prints as itself.
"""

from __future__ import annotations

import functools
from typing import Any

from omegaconf import OmegaConf

import imsm

# without a dataset file (or its headline): the first of these that the metric dict holds
DEFAULT_HEADLINE = ("mcc", "f1", "accuracy", "exact_match")
# used until conf/gate/*.yaml carry their own ``label``
GATE_SUFFIX = {
    "none": "",
    "query_aware": " + IMSM",
    "no_query": " + IMSM w/o query",
    "fixed": " + IMSM w/o gate",
}


@functools.cache
def conf_entry(group: str, name: str) -> dict[str, Any]:
    """``conf/<group>/<name>.yaml`` as a plain dict (its own keys; ``defaults`` are not merged); {} if absent."""
    if not name or "/" in name or "\\" in name:
        return {}
    path = imsm.CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        return {}
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return data if isinstance(data, dict) else {}


def peft_label(name: str) -> str:
    """``lora`` -> ``LoRA`` (the file's ``label``), else the name itself."""
    return str(conf_entry("peft", name).get("label") or name)


def gate_suffix(name: str) -> str:
    """What the gate adds to a method's name: ``""`` (none), ``" + IMSM"``, ...; unknown: ``" + gate <name>"``."""
    entry = conf_entry("gate", name)
    if "label" not in entry:
        return GATE_SUFFIX.get(name, f" + gate {name}")
    label = str(entry["label"] or "").strip()
    if not label:
        return ""
    return f" {label}" if label.startswith("+") else f" + {label}"


def dataset_label(name: str) -> str:
    """``cola`` -> ``CoLA``, else the name itself."""
    return str(conf_entry("dataset", name).get("label") or name)


def headline(name: str) -> tuple[str, ...]:
    """The metric(s) a dataset's column shows, in preference order (``conf/dataset/<name>.yaml: headline``)."""
    value = conf_entry("dataset", name).get("headline")
    if value is None:
        return DEFAULT_HEADLINE
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def headline_score(dataset: str, metrics: dict[str, Any] | None) -> float | None:
    """The dataset's headline metric from one metric dict, in percent; None when the dict lacks it."""
    for name in headline(dataset):
        if metrics and isinstance(metrics.get(name), int | float) and not isinstance(metrics[name], bool):
            return 100.0 * float(metrics[name])
    return None
