"""Questions to the command line that need no model are answered before torch and transformers load.

``python -m imsm.train --help`` used to take ~8 s: the entry modules import torch, transformers and peft before
Hydra parses the arguments. ``quick_answer`` runs first (at the top of ``imsm/train.py`` and ``imsm/evaluate.py``):
when the command only asks Hydra for help, the composed config or Hydra's info, a no-op Hydra app answers it (Hydra
never calls the task for these flags) and the process exits.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

QUICK_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc")


def quick_answer(module_name: str, config_name: str) -> None:
    """Answer ``--help`` / ``--cfg`` / ``--info`` for ``config_name`` and exit, when run as ``module_name``."""
    if module_name != "__main__" or not any(arg.split("=")[0] in QUICK_FLAGS for arg in sys.argv[1:]):
        return
    import hydra

    from imsm import CONF_DIR

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def app(cfg: object) -> None:  # pragma: no cover - Hydra answers these flags without calling the task
        return None

    app()
    sys.exit(0)


def train() -> None:
    """``imsm-train``: ``python -m imsm.train``, with the quick answers first."""
    quick_answer("__main__", "train")
    from imsm.train import main

    main()


def evaluate() -> None:
    """``imsm-evaluate``: ``python -m imsm.evaluate``, with the quick answers first."""
    quick_answer("__main__", "evaluate")
    from imsm.evaluate import main

    main()


def absolute_paths(cfg: Any, keys: tuple[str, ...]) -> None:
    """Make the relative paths among ``keys`` absolute against the directory the command was started in.

    With ``hydra.job.chdir=true`` the job runs inside its output directory, where ``data_dir=../shared/data`` or
    ``run_dir=runs/x`` would point elsewhere. A backbone path counts only if it exists there (else it is a hub id).
    """
    from hydra.utils import to_absolute_path
    from omegaconf import OmegaConf

    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            continue
        absolute = to_absolute_path(value)
        if key.endswith("name_or_path") and not Path(absolute).exists():
            continue
        OmegaConf.update(cfg, key, absolute)


# --- a sweep's exit status -------------------------------------------------------------------------------------
REFUSED_DIR = ".imsm-refused"  # under the sweep directory: one file per job refused its run directory


def record_refused(sweep_dir: str | Path, job: str, message: str) -> None:
    """A job refused its run directory writes no record there (not its to write): note it for ``SweepStatus``."""
    folder = Path(sweep_dir) / REFUSED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{job}.txt").write_text(message + "\n", encoding="utf-8")


class SweepStatus(Callback):
    """``hydra.callbacks``: after a multirun, exit 1 with one line per failed job if any failed.

    Runs in the launching process once every job ended, whatever the launcher (basic, joblib, submitit): the failed
    jobs are the records with ``status: failed`` written under the sweep directory during this sweep, and the jobs
    refused their run directory (``record_refused``) during it.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        failed = []
        for path in sorted(sweep.rglob("metrics.json")):
            data = self._since_start(path, json.loads)
            if isinstance(data, dict) and data.get("status") == "failed" and "backbone" in data:
                failed.append(f"{path.parent}: {data.get('error')}")
        for path in sorted((sweep / REFUSED_DIR).glob("*.txt")):
            text = self._since_start(path, str.strip)
            if text:
                failed.append(text)
        if failed:
            print(f"\n{len(failed)} job(s) of the sweep failed:", *failed, sep="\n- ", file=sys.stderr)
            sys.exit(1)

    def _since_start(self, path: Path, parse: Any) -> Any:
        """``parse(text)`` of a file written during this sweep, else None."""
        try:
            if path.stat().st_mtime < getattr(self, "started", 0):
                return None
            return parse(path.read_text())
        except (OSError, ValueError):
            return None
