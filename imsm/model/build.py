"""Build an ``IMSMModel`` from the run config, save it into a run directory, and load it back.

A run directory holds ``adapter/`` (peft ``save_pretrained``: loadable by plain ``PeftModel.from_pretrained``),
``gate.safetensors`` + ``gate.json`` (never pickle) and ``config.yaml`` (the resolved run config, which says how to
rebuild the backbone).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from imsm.backbones import load_backbone
from imsm.model.gate import build_gate
from imsm.model.siamese import IMSMModel

log = logging.getLogger(__name__)

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate.json"
ADAPTER_DIR = "adapter"
RUN_CONFIG = "config.yaml"


def build_peft_config(peft_cfg: DictConfig, backbone_cfg: DictConfig) -> PeftConfig:
    """Instantiate the peft config class named in ``peft.config._target_``.

    ``target_modules`` left null in the method file come from the backbone file (``target_modules.<method>``), so
    each backbone keeps the paper's per-method module lists.
    """
    overrides: dict[str, Any] = {"task_type": "CAUSAL_LM"}
    node = peft_cfg.config
    per_backbone = backbone_cfg.get("target_modules") or {}
    lookup = {"target_modules": peft_cfg.name, "feedforward_modules": f"{peft_cfg.name}_feedforward"}
    for key, entry in lookup.items():
        if key in node and node[key] is None and per_backbone.get(entry) is not None:
            overrides[key] = list(per_backbone[entry])
    config = instantiate(node, **overrides, _convert_="all")
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(
            f"peft={peft_cfg.name} ({type(config).__name__}) is prompt/prefix learning. IMSM needs an adapter injected "
            "into the backbone's layers (LoRA, IA3, AdaLoRA, DoRA, LoHa, ...), so the frozen stream is the same "
            "model with that adapter switched off."
        )
    return config


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the model's linear layers (what ``target_modules`` can name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def attach_adapter(backbone: PreTrainedModel, config: PeftConfig) -> PeftModel:
    """``get_peft_model`` with an error listing the model's linear modules when a target does not exist."""
    try:
        return get_peft_model(backbone, config)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            raise ValueError(f"{e}\nLinear modules of this backbone: {linear_module_names(backbone)}") from e
        raise


def build_model(cfg: DictConfig) -> tuple[IMSMModel, PreTrainedTokenizerBase]:
    """Backbone + fresh adapter + fresh gate, as the run config says. Only adapter and gate train."""
    backbone, tokenizer = load_backbone(cfg.backbone)
    for p in backbone.parameters():
        p.requires_grad_(False)
    peft_model = attach_adapter(backbone, build_peft_config(cfg.peft, cfg.backbone))
    gate = build_gate(
        cfg.gate.type,
        backbone.config.hidden_size,
        rank=cfg.gate.rank,
        dropout=cfg.gate.dropout,
        value=cfg.gate.value,
    )
    if gate is not None:
        gate.to(device=next(backbone.parameters()).device, dtype=torch.float32)
    model = IMSMModel(peft_model, gate, pooling=cfg.gate.pooling)
    model.check_trainable()
    return model, tokenizer


def save_model(model: IMSMModel, run_dir: str | Path, cfg: DictConfig | None = None) -> None:
    """Adapter (peft format), gate (safetensors + json) and, if given, the resolved config."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.peft_model.save_pretrained(run_dir / ADAPTER_DIR)
    gate_meta: dict[str, Any] = {"type": "none", "pooling": model.pooling}
    if model.gate is not None:
        gate_meta.update(
            type=model.gate.kind,
            rank=getattr(model.gate, "rank", None),
            value=getattr(model.gate, "value", None),
            dropout=model.gate.dropout.p if hasattr(model.gate, "dropout") else 0.0,
        )
        state = {k: v.detach().contiguous().cpu() for k, v in model.gate.state_dict().items()}
        if state:
            save_file(state, str(run_dir / GATE_WEIGHTS))
    (run_dir / GATE_CONFIG).write_text(json.dumps(gate_meta, indent=2))
    if cfg is not None:
        (run_dir / RUN_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def load_model(run_dir: str | Path, device: str | None = None) -> tuple[IMSMModel, PreTrainedTokenizerBase]:
    """Rebuild a saved run: backbone from its config, adapter via ``PeftModel.from_pretrained``, gate weights."""
    run_dir = Path(run_dir)
    for needed in (RUN_CONFIG, GATE_CONFIG, ADAPTER_DIR):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(f"{run_dir} is not an IMSM run directory: {needed} is missing")
    cfg = OmegaConf.load(run_dir / RUN_CONFIG)
    backbone, tokenizer = load_backbone(cfg.backbone, device=device)
    peft_model = PeftModel.from_pretrained(backbone, run_dir / ADAPTER_DIR)
    peft_model.eval()
    meta = json.loads((run_dir / GATE_CONFIG).read_text())
    gate = build_gate(
        meta["type"],
        backbone.config.hidden_size,
        rank=meta.get("rank") or 8,
        dropout=meta.get("dropout") or 0.0,
        value=meta.get("value") if meta.get("value") is not None else 0.5,
    )
    if gate is not None:
        if (run_dir / GATE_WEIGHTS).exists():
            gate.load_state_dict(load_file(str(run_dir / GATE_WEIGHTS)))
        gate.to(device=next(backbone.parameters()).device, dtype=torch.float32)
    model = IMSMModel(peft_model, gate, pooling=meta.get("pooling", "mean"))
    model.eval()
    return model, tokenizer


IMSMModel.from_pretrained = staticmethod(load_model)  # type: ignore[attr-defined]
IMSMModel.save_pretrained = save_model  # type: ignore[attr-defined]
