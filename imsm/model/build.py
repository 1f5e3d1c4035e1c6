"""Build an ``IMSMModel`` from the run config: backbone, the ``peft`` node's adapter, the ``gate`` node's gate.

Saving and loading a run are ``IMSMModel.save_pretrained`` / ``IMSMModel.from_pretrained`` (the format is in
``imsm.model.checkpoint``); ``save_model`` / ``load_model`` here are the same functions under their older names.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from peft import AdaLoraConfig, PeftConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from imsm.backbones import load_backbone
from imsm.model.adalora import adalora_schedule, freeze_ranknum
from imsm.model.adapters import AdapterModel, adapter_kind, peft_type_of
from imsm.model.checkpoint import ADAPTER_DIR, GATE_CONFIG, GATE_WEIGHTS, RUN_CONFIG
from imsm.model.families import family_of, prepare_backbone
from imsm.model.gate import gate_from_config
from imsm.model.guard import check_adapter, fingerprints
from imsm.model.loramoe import LoRAMoEConfig
from imsm.model.siamese import IMSMModel

log = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_DIR",
    "GATE_CONFIG",
    "GATE_WEIGHTS",
    "RUN_CONFIG",
    "attach_adapter",
    "build_model",
    "build_peft_config",
    "load_model",
    "save_model",
    "wrap_backbone",
]


def backbone_targets(peft_cfg: DictConfig, backbone_cfg: DictConfig, field: str) -> list[str] | None:
    """The backbone file's module list for ``field`` of this method, or None when it has none.

    Looked up as ``target_modules.<peft.name>`` (``<peft.name>_feedforward`` for ``feedforward_modules``), then under
    ``peft.targets`` (a method that borrows another's lists, e.g. LoHa -> ``lora``). An empty list is kept: IA3 on
    Qwen1.5 has no feed-forward module.
    """
    per_backbone = backbone_cfg.get("target_modules") or {}
    suffix = "_feedforward" if field == "feedforward_modules" else ""
    for key in (peft_cfg.name, peft_cfg.get("targets")):
        if key and per_backbone.get(f"{key}{suffix}") is not None:
            return list(per_backbone[f"{key}{suffix}"])
    return None


def build_peft_config(
    peft_cfg: DictConfig, backbone_cfg: DictConfig, total_steps: int | None = None
) -> PeftConfig:
    """Instantiate the peft config class named in ``peft.config._target_``.

    ``target_modules`` / ``feedforward_modules`` left null in the method file come from the backbone file (see
    ``backbone_targets``), so each backbone keeps the paper's per-method module lists. AdaLoRA's ``total_step`` (and
    ``tinit`` / ``tfinal`` given as fractions) are set from ``total_steps``, the run's optimizer steps.
    """
    node = peft_cfg.config
    overrides: dict[str, Any] = {"task_type": "CAUSAL_LM"}
    where = f"conf/peft/{peft_cfg.get('name')}.yaml"
    for field in ("target_modules", "feedforward_modules"):
        if field not in node or node[field] is not None:
            continue
        found = backbone_targets(peft_cfg, backbone_cfg, field)
        if found is None:
            keys = [k for k in (peft_cfg.get("name"), peft_cfg.get("targets")) if k]
            suffix = "_feedforward" if field == "feedforward_modules" else ""
            raise ValueError(
                f"peft={peft_cfg.get('name')}: config.{field} is null in {where} and backbone "
                f"{backbone_cfg.get('name')} names none under target_modules.{{{', '.join(k + suffix for k in keys)}}} "
                f"(it has {sorted(backbone_cfg.get('target_modules') or {})}). Add one to "
                f"conf/backbone/{backbone_cfg.get('name')}.yaml ([] for none) or set peft.config.{field}."
            )
        overrides[field] = found
    config_cls = get_class(node._target_)
    if issubclass(config_cls, AdaLoraConfig):
        steps = node.get("total_step") or total_steps
        if not steps:
            raise ValueError(
                f"peft={peft_cfg.get('name')}: AdaLoRA needs its total number of optimizer steps. train() computes it "
                "from the data (build_model(cfg, total_steps=...)); or set peft.config.total_step."
            )
        overrides.update(adalora_schedule(OmegaConf.to_container(node), int(steps)))  # type: ignore[arg-type]
    config = instantiate(node, **overrides, _convert_="all")
    if getattr(config, "is_prompt_learning", False) or getattr(config, "is_adaption_prompt", False):
        raise ValueError(
            f"peft={peft_cfg.get('name')} ({type(config).__name__}) is prompt/prefix learning. IMSM needs an adapter "
            "injected into the backbone's layers (LoRA, IA3, AdaLoRA, DoRA, LoHa, ...), so the frozen stream is the "
            "same model with that adapter switched off."
        )
    return config


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the model's linear layers (what ``target_modules`` can name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def attach_adapter(backbone: PreTrainedModel, config: PeftConfig | LoRAMoEConfig) -> AdapterModel:
    """The adapter kind of ``config.peft_type`` attached to ``backbone`` (``imsm.model.adapters.ADAPTER_KINDS``:
    peft's ``get_peft_model``, or LoRAMoE's injection), with an error listing the model's linear modules when a
    target does not exist.
    """
    try:
        return adapter_kind(peft_type_of(config)).attach(backbone, config)
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            raise ValueError(
                f"{e}\nLinear modules of this backbone ({type(backbone).__name__}): {linear_module_names(backbone)}"
            ) from e
        raise


def wrap_backbone(backbone: PreTrainedModel, cfg: DictConfig, total_steps: int | None = None) -> IMSMModel:
    """Freeze ``backbone``, inject ``cfg.peft``'s adapter, add ``cfg.gate``: the model that trains.

    Also used by the dry run on a meta-device backbone, so the counts it prints are those of a real run.
    """
    prepare_backbone(backbone)
    for p in backbone.parameters():
        p.requires_grad_(False)
    config = build_peft_config(cfg.peft, cfg.backbone, total_steps)
    before = fingerprints(
        backbone
    )  # attaching must leave the pretrained weights as they are (imsm.model.guard)
    peft_model = attach_adapter(backbone, config)
    freeze_ranknum(peft_model)
    check_adapter(peft_model, config, before, head_of=lambda: family_of(backbone).head(backbone))
    gate = gate_from_config(cfg.gate, backbone.config.hidden_size)
    if gate is not None:
        gate.to(device=next(backbone.parameters()).device, dtype=torch.float32)
    model = IMSMModel(peft_model, gate, pooling=cfg.gate.get("pooling", "mean"))
    model.check_trainable()
    return model


def build_model(cfg: DictConfig, total_steps: int | None = None) -> tuple[IMSMModel, PreTrainedTokenizerBase]:
    """Backbone + fresh adapter + fresh gate, as the run config says. Only adapter and gate train.

    ``total_steps``: the run's optimizer steps (AdaLoRA's budget schedule needs it; other methods ignore it).
    """
    backbone, tokenizer = load_backbone(cfg.backbone)
    return wrap_backbone(backbone, cfg, total_steps), tokenizer


def save_model(model: IMSMModel, run_dir: str | Path, cfg: DictConfig | None = None) -> None:
    """``model.save_pretrained(run_dir, cfg)``: adapter (peft format), gate (safetensors + json), resolved config."""
    model.save_pretrained(run_dir, cfg)


def load_model(
    run_dir: str | Path, device: str | None = None, trust_remote_code: bool = False
) -> tuple[IMSMModel, PreTrainedTokenizerBase]:
    """``IMSMModel.from_pretrained(run_dir, device, trust_remote_code)``: the saved run's model and tokenizer."""
    return IMSMModel.from_pretrained(run_dir, device=device, trust_remote_code=trust_remote_code)
