"""The trainable-parameter table (the paper's "Params" column) without a single weight.

``python -m imsm.train backbone=llama3 peft=lora dry_run=true`` builds the backbone from the architecture numbers
in its YAML (``backbone.architecture``, copied from the model's ``config.json``) on the meta device: tensors have
shapes and no storage, so an 8B model costs nothing and nothing is downloaded, not even the tokenizer. The same
``wrap_backbone`` as a real run then injects the PEFT method and the gate, so the counts are the ones training
reports. ChatGLM3 has no transformers class (remote code only): it is built as ``ChatGLMStandIn``, a module tree with
the same names and linear shapes, so target matching and counts equal the real model's.

Entry point: ``python -m imsm.dryrun backbone=llama3 peft=lora`` (or ``imsm-dryrun``) composes the same config as
``imsm.train`` (whose ``dry_run=true`` stays as an alias); a multirun (``-m backbone=llama2,llama3 peft=lora,ia3``)
prints the header once and one row per job. ``python -m imsm.dryrun --paper [overrides]`` prints every paper
backbone x method in one process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from imsm import CONF_DIR
from imsm.model.build import wrap_backbone
from imsm.model.chatglm import ChatGLMStandIn, ChatGLMStandInConfig

TINY_VOCAB = (
    49152  # tiny backbones take the SmolLM2 tokenizer's vocabulary unless backbone.tokenizer says otherwise
)
ADALORA_PLACEHOLDER_STEPS = 1000  # AdaLoRA's schedule needs a step count; no parameter count depends on it
PAPER_BACKBONES = ("chatglm3", "qwen1_5", "llama2", "llama3", "llama3_1")
PAPER_METHODS = ("lora", "ia3", "adalora", "dora")
# Figure 3's baseline: LoRAMoE on Llama2-7B. Per routed linear (in -> out): router in x E + E r (in + out), so with
# E 6, r 4 on gate/up (4096 -> 11008) and down (11008 -> 4096): 32 x (2 x 387,072 + 428,544) = 38,486,016.
FIGURE3_ROWS = (("llama2", "loramoe"),)
COLUMNS = (
    ("backbone", 10),
    ("peft", 8),
    ("gate", 17),
    ("backbone params", 16),
    ("PEFT params", 13),
    ("gate params", 12),
    ("trainable", 12),
    ("% of backbone", 14),
)


def architecture(backbone_cfg: DictConfig) -> dict[str, Any]:
    """``backbone.architecture`` (config.json numbers), or a tiny backbone's ``tiny`` node with its vocabulary."""
    if backbone_cfg.get("architecture"):
        return dict(OmegaConf.to_container(backbone_cfg.architecture, resolve=True))  # type: ignore[arg-type]
    if backbone_cfg.get("tiny"):
        arch = dict(OmegaConf.to_container(backbone_cfg.tiny, resolve=True))  # type: ignore[arg-type]
        arch.pop("seed", None)
        arch.setdefault("vocab_size", TINY_VOCAB)
        return arch
    raise ValueError(
        f"backbone {backbone_cfg.get('name')}: a dry run needs backbone.architecture (model_type, hidden_size, "
        "num_hidden_layers, ... from the model's config.json) in its YAML file"
    )


def meta_backbone(backbone_cfg: DictConfig) -> PreTrainedModel:
    """The backbone with shapes and no storage (``torch.device("meta")``); no file is read or downloaded."""
    arch = architecture(backbone_cfg)
    model_type = arch.pop("model_type")
    with torch.device("meta"):
        if model_type == "chatglm":
            return ChatGLMStandIn(ChatGLMStandInConfig(**arch))
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **arch))


def dry_run(cfg: DictConfig, print_header: bool | None = None) -> dict[str, Any]:
    """Build ``cfg``'s model on the meta device and print its parameter row; returns the row as a dict.

    Counts: ``adapter`` (the PEFT method; AdaLoRA at its initial rank ``init_r``), ``gate`` (5 d r for the
    query-aware gate), ``total``, and ``percent`` = total / backbone parameters x 100.
    """
    backbone = meta_backbone(cfg.backbone)
    backbone_params = sum(p.numel() for p in backbone.parameters())
    max_steps = int(cfg.trainer.args.get("max_steps", -1) or -1)
    model = wrap_backbone(backbone, cfg, max_steps if max_steps > 0 else ADALORA_PLACEHOLDER_STEPS)
    counts = model.trainable_parameters()
    row = {
        "status": "dry_run",
        "backbone": cfg.backbone.name,
        "peft": cfg.peft.name,
        "gate": cfg.gate.type,
        "gate_rank": cfg.gate.get("rank"),
        "backbone_params": backbone_params,
        "trainable_parameters": counts,
        "percent": 100.0 * counts["total"] / backbone_params,
    }
    header, job_dir = _hydra_context()
    print(format_table([row], header=header if print_header is None else print_header), flush=True)
    run_dir = cfg.get("run_dir") or job_dir
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "dry_run.json").write_text(json.dumps(row, indent=2))
    return row


def _hydra_context() -> tuple[bool, str | None]:
    """(print the header?, this job's output dir): the header once per multirun, at job 0."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True, None
    hc = HydraConfig.get()
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    return (not multirun or int(hc.job.num) == 0), hc.runtime.output_dir


def format_table(rows: list[dict[str, Any]], header: bool = True) -> str:
    """Fixed-width rows (exact counts with thousands separators)."""

    def line(cells: tuple[str, ...]) -> str:  # three text columns left-aligned, the numbers right-aligned
        return "".join(
            f"{c:>{w}}" if i > 2 else f"{c:<{w}}"
            for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS, strict=True))
        )

    lines = [line(tuple(name for name, _ in COLUMNS))] if header else []
    for r in rows:
        p = r["trainable_parameters"]
        gate = r["gate"] + (f" r{r['gate_rank']}" if p["gate"] else "")
        values = (
            r["backbone"],
            r["peft"],
            gate,
            f"{r['backbone_params']:,}",
            f"{p['adapter']:,}",
            f"{p['gate']:,}",
            f"{p['total']:,}",
            f"{r['percent']:.4f}",
        )
        lines.append(line(values))
    return "\n".join(lines)


def paper_table(overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """Dry-run rows for every paper backbone x method, then Figure 3's LoRAMoE row (extra Hydra ``overrides``
    apply to all)."""
    from hydra import compose, initialize_config_dir

    conf = str(CONF_DIR)
    rows = []
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        for i, backbone in enumerate(PAPER_BACKBONES):
            for j, method in enumerate(PAPER_METHODS):
                cfg = compose(
                    "train", [f"backbone={backbone}", f"peft={method}", "dry_run=true", *(overrides or [])]
                )
                rows.append(dry_run(cfg, print_header=i == j == 0))
        for backbone, method in FIGURE3_ROWS:
            cfg = compose(
                "train", [f"backbone={backbone}", f"peft={method}", "dry_run=true", *(overrides or [])]
            )
            rows.append(dry_run(cfg, print_header=False))
    return rows


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    dry_run(cfg)


def main() -> None:
    """``python -m imsm.dryrun [overrides]``: one row (or a multirun's table); ``--paper``: the paper's whole table."""
    if "--paper" in sys.argv[1:]:
        paper_table([a for a in sys.argv[1:] if a != "--paper"])
    else:
        hydra_main()


if __name__ == "__main__":
    main()
