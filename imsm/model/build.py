"""Build an ``IMSMModel`` from the run config, save it into a run directory, and load it back.

A run directory holds ``adapter/`` (peft ``save_pretrained``: loadable by plain ``PeftModel.from_pretrained``;
LoRAMoE, not a peft method, writes the same two files with ``peft_type: LORAMOE``, see ``imsm.model.loramoe``),
``gate.safetensors`` + ``gate.json`` (never pickle) and ``config.yaml`` (the resolved run config, which says how to
rebuild the backbone).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from peft import AdaLoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from imsm.backbones import load_backbone
from imsm.io import write_json, write_text_atomic
from imsm.model.adalora import adalora_schedule, freeze_ranknum
from imsm.model.families import prepare_backbone
from imsm.model.gate import build_gate
from imsm.model.loramoe import LoRAMoEConfig, LoRAMoEModel, is_loramoe_adapter
from imsm.model.siamese import IMSMModel

log = logging.getLogger(__name__)

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate.json"
ADAPTER_DIR = "adapter"
RUN_CONFIG = "config.yaml"


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


def attach_adapter(backbone: PreTrainedModel, config: PeftConfig | LoRAMoEConfig) -> PeftModel | LoRAMoEModel:
    """``get_peft_model`` with an error listing the model's linear modules when a target does not exist.

    LoRAMoE is not a peft method: its layers are injected by ``imsm.model.loramoe`` behind the same interface.
    """
    try:
        if isinstance(config, LoRAMoEConfig):
            return LoRAMoEModel(backbone, config)
        return get_peft_model(backbone, config)
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
    peft_model = attach_adapter(backbone, build_peft_config(cfg.peft, cfg.backbone, total_steps))
    freeze_ranknum(peft_model)
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
    return model


def build_model(cfg: DictConfig, total_steps: int | None = None) -> tuple[IMSMModel, PreTrainedTokenizerBase]:
    """Backbone + fresh adapter + fresh gate, as the run config says. Only adapter and gate train.

    ``total_steps``: the run's optimizer steps (AdaLoRA's budget schedule needs it; other methods ignore it).
    """
    backbone, tokenizer = load_backbone(cfg.backbone)
    return wrap_backbone(backbone, cfg, total_steps), tokenizer


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
    write_json(run_dir / GATE_CONFIG, gate_meta)
    if cfg is not None:
        write_text_atomic(run_dir / RUN_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))


def load_model(run_dir: str | Path, device: str | None = None) -> tuple[IMSMModel, PreTrainedTokenizerBase]:
    """Rebuild a saved run: backbone from its config, adapter via ``PeftModel.from_pretrained``, gate weights."""
    run_dir = Path(run_dir)
    for needed in (RUN_CONFIG, GATE_CONFIG, ADAPTER_DIR):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(f"{run_dir} is not an IMSM run directory: {needed} is missing")
    cfg = OmegaConf.load(run_dir / RUN_CONFIG)
    backbone, tokenizer = load_backbone(cfg.backbone, device=device)
    loramoe = is_loramoe_adapter(run_dir / ADAPTER_DIR)  # not a peft method: its own loader, same interface
    load_adapter = LoRAMoEModel.from_pretrained if loramoe else PeftModel.from_pretrained
    peft_model = load_adapter(prepare_backbone(backbone), run_dir / ADAPTER_DIR)
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
