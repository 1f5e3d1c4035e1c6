"""Experiment tracking (``conf/logger/``): ``logger=wandb`` logs a run to Weights & Biases, ``logger=none`` nothing.

A W&B run gets the resolved config, the training curves (transformers' ``WandbCallback`` on the ``Trainer``), the
final metrics in its summary and a sample of predictions as a table. Its group is the experiment (``table2``), its
name the Hydra choices, so a sweep is one dashboard. Without an API key (``WANDB_API_KEY`` or a ``~/.netrc`` entry)
it logs offline into ``<run_dir>/wandb/`` (``wandb sync`` uploads it later); ``logger.mode`` or ``WANDB_MODE``
overrides that. Only the main process (``RANK`` 0) logs. ``read_offline_run`` reads such a directory back.
"""

from __future__ import annotations

import json
import netrc
import os
import struct
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

# the .wandb file: a 7-byte header, then LevelDB-log style chunks (crc32, length, type) in 32 KiB blocks
_MAGIC = b":W&B"
_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def enabled(cfg: DictConfig) -> bool:
    return (cfg.get("logger") or {}).get("name") == "wandb"


def has_api_key() -> bool:
    """An API key in the environment or in ``~/.netrc`` for the W&B host: online logging is possible."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str | None) -> str:
    """``logger.mode``, else ``WANDB_MODE``, else online with an API key and offline without."""
    return mode or os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def start(cfg: DictConfig, run_dir: Path) -> Any | None:
    """Open a W&B run for this job (main process only); ``None`` when ``logger=none``."""
    if not enabled(cfg) or not is_main_process():
        return None
    import wandb

    lg = cfg.logger
    run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=lg.project,
        entity=lg.get("entity"),
        group=lg.get("group"),
        name=lg.get("run_name"),
        tags=list(lg.get("tags") or []),
        config=OmegaConf.to_container(cfg, resolve=True),  # type: ignore[arg-type]
        dir=str(run_dir),
        mode=resolve_mode(lg.get("mode")),
        reinit="finish_previous",  # a multirun opens one run per job in the same process
    )


def trainer_callbacks(run: Any | None) -> list[Any]:
    """transformers' ``WandbCallback``: it reuses the open run and logs the loss / lr curves."""
    if run is None:
        return []
    from transformers.integrations import WandbCallback

    return [WandbCallback()]


def flatten_metrics(result: dict[str, Any]) -> dict[str, float]:
    """``{"<target>/<metric>": v, "<dataset>/<metric>": v, "original/<dataset>/<metric>": v}`` of a result."""
    flat: dict[str, float] = {}
    sections = [(result.get("dataset", "target"), result.get("metrics") or {}, "")]
    sections.append((result.get("dataset", "target"), result.get("base_metrics") or {}, "original/"))
    sections += [(n, m, "") for n, m in (result.get("eval_datasets") or {}).items()]
    sections += [(n, m, "original/") for n, m in (result.get("base_eval_datasets") or {}).items()]
    for name, metrics, prefix in sections:
        for k, v in metrics.items():
            if isinstance(v, int | float):
                flat[f"{prefix}eval/{name}/{k}"] = v
    return flat


def log_results(run: Any | None, cfg: DictConfig, result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Final metrics into the run summary, the first ``logger.predictions`` predictions as a table."""
    if run is None:
        return
    import wandb

    run.summary.update(flatten_metrics(result))
    for key in ("train_loss", "train_seconds", "eval_seconds", "wall_seconds", "status"):
        if key in result:
            run.summary[key] = result[key]
    run.summary["trainable_parameters"] = (result.get("trainable_parameters") or {}).get("total")
    sample = rows[: int(cfg.logger.get("predictions") or 0)]
    if sample:
        columns = ["prompt", "generation", "gold", "correct"]
        table = wandb.Table(
            columns=columns,
            data=[[json.dumps(r.get(c)) if c == "gold" else r.get(c) for c in columns] for r in sample],
        )
        run.log({"predictions": table})


def finish(run: Any | None, failed: bool = False) -> None:
    if run is not None:
        run.finish(exit_code=1 if failed else 0)


def finish_active(failed: bool = True) -> None:
    """Close a run left open by a job that raised (only if wandb was ever imported)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.finish(exit_code=1 if failed else 0)


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if data[:4] != _MAGIC:
        raise ValueError(f"{path}: not a W&B run file (starts with {data[:4]!r}, expected {_MAGIC!r})")
    pos, out, buf = 7, [], b""
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # the writer pads a block's tail that cannot hold a chunk header
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _CHUNK_HEADER])
        pos += _CHUNK_HEADER
        if kind == 0 and length == 0:
            break
        buf += data[pos : pos + length]
        pos += length
        if kind in (_FULL, _LAST):
            out.append(buf)
            buf = b""
    return out


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """What an offline run logged: ``{"run": {name, group, project}, "config", "history": [...], "summary"}``.

    ``run_dir`` is ``wandb/offline-run-*`` or any directory above exactly one of them.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).rglob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb under {run_dir}, found {[str(f) for f in files]}")
    out: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}}

    def value(item: Any) -> Any:
        return json.loads(item.value_json)

    def key(item: Any) -> str:
        return "/".join(item.nested_key) if item.nested_key else item.key

    for raw in _records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            # a run may be re-sent with only some fields set: keep what is known
            fields = {"name": rec.run.display_name, "group": rec.run.run_group, "project": rec.run.project}
            out["run"].update({k: v for k, v in fields.items() if v})
            out["config"].update({key(i): value(i) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({key(i): value(i) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({key(i): value(i) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): value(i) for i in rec.summary.update})
    return out
