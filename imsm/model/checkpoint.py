"""A run directory on disk: what ``IMSMModel.save_pretrained`` writes and ``IMSMModel.from_pretrained`` reads.

```
run_dir/
  adapter/            the adapter's own save_pretrained (adapter_config.json + weights, never the backbone):
                      peft's format, so plain ``PeftModel.from_pretrained(backbone, run_dir / "adapter")`` loads it;
                      LoRAMoE writes the same two files with ``peft_type: LORAMOE`` (``imsm.model.adapters``)
  gate.safetensors    the gate's weights (absent for gates without parameters); never pickle
  gate.json           {"type", "pooling", "rank", "value", "dropout"}: enough to rebuild the gate module
  config.yaml         the resolved run config; its ``backbone`` node says how to rebuild the frozen backbone
```

``huggingface_hub.PyTorchModelHubMixin`` was considered for these two methods and left out: its ``save_pretrained``
writes the whole ``state_dict`` (the frozen backbone included), a ``config.json`` built from JSON-able ``__init__``
arguments (``IMSMModel`` takes a live ``PeftModel`` and gate) and a ``README.md`` card into the run directory, and
its ``from_pretrained`` returns the model alone while ours returns ``(model, tokenizer)``. Overriding all of that to
keep this format would leave only ``push_to_hub``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from imsm.backbones import load_backbone, public_name
from imsm.io import share, write_json, write_text_atomic
from imsm.model.adapters import adapter_kind, saved_peft_type
from imsm.model.families import prepare_backbone
from imsm.model.gate import build_gate
from imsm.model.siamese import IMSMModel

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate.json"
ADAPTER_DIR = "adapter"
RUN_CONFIG = "config.yaml"


def gate_meta(gate: nn.Module | None, pooling: str) -> dict[str, Any]:
    """``gate.json``'s content: the gate's type and settings (the format every saved run has)."""
    meta: dict[str, Any] = {"type": "none", "pooling": pooling}
    if gate is not None:
        meta.update(
            type=gate.kind,
            rank=getattr(gate, "rank", None),
            value=getattr(gate, "value", None),
            dropout=gate.dropout.p if hasattr(gate, "dropout") else 0.0,
        )
    return meta


def gate_from_meta(meta: dict[str, Any], hidden_size: int) -> nn.Module | None:
    """The gate module ``gate.json`` describes, freshly initialised (its weights come from ``gate.safetensors``)."""
    return build_gate(
        meta["type"],
        hidden_size,
        rank=meta.get("rank") or 8,
        dropout=meta.get("dropout") or 0.0,
        value=meta.get("value") if meta.get("value") is not None else 0.5,
    )


def name_base_model(adapter_config: Path, name: str | None) -> None:
    """``base_model_name_or_path`` as a colleague elsewhere would load it, not the path on this machine (None:
    unknown). Written after peft's save: set before it, peft would look the hub id up online to inspect the vocab."""
    if not adapter_config.is_file():
        return
    config = json.loads(adapter_config.read_text())
    config["base_model_name_or_path"] = name
    write_json(adapter_config, config)


def save_run(model: IMSMModel, run_dir: str | Path, cfg: DictConfig | None = None) -> None:
    """Adapter (peft format), gate (safetensors + json) and, if given, the resolved config."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.peft_model.save_pretrained(run_dir / ADAPTER_DIR)
    if cfg is not None:
        name_base_model(run_dir / ADAPTER_DIR / "adapter_config.json", public_name(cfg.backbone))
    if model.gate is not None:
        state = {k: v.detach().contiguous().cpu() for k, v in model.gate.state_dict().items()}
        if state:
            save_file(state, str(run_dir / GATE_WEIGHTS))
    # safetensors (peft's adapter file too) writes 0600: a team sharing a cluster must be able to read the run
    share(*run_dir.glob("*.safetensors"), *(run_dir / ADAPTER_DIR).glob("*.safetensors"))
    write_json(run_dir / GATE_CONFIG, gate_meta(model.gate, model.pooling))
    if cfg is not None:
        write_text_atomic(run_dir / RUN_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))


def load_run(
    run_dir: str | Path, device: str | None = None, trust_remote_code: bool = False
) -> tuple[IMSMModel, PreTrainedTokenizerBase]:
    """Rebuild a saved run in eval mode: backbone from its config, the adapter by its kind, the gate's weights.

    A run's ``config.yaml`` may ask for the backbone's own Python code (``backbone.trust_remote_code: true``, e.g.
    ChatGLM3). Loading a directory someone sent must not run code unless the caller asks: that config is refused
    unless ``trust_remote_code=True`` is passed here (``imsm.evaluate ... trust_remote_code=true``).

    Raises:
        FileNotFoundError: ``run_dir`` lacks one of ``config.yaml``, ``gate.json``, ``adapter/``.
        PermissionError: the run's config asks for remote code and ``trust_remote_code`` is False.
    """
    run_dir = Path(run_dir)
    for needed in (RUN_CONFIG, GATE_CONFIG, ADAPTER_DIR):
        if not (run_dir / needed).exists():
            raise FileNotFoundError(
                f"{run_dir} is not an IMSM run directory: {needed} is missing "
                f"(a run holds {RUN_CONFIG}, {GATE_CONFIG}, {ADAPTER_DIR}/)"
            )
    cfg = OmegaConf.load(run_dir / RUN_CONFIG)
    if cfg.backbone.get("trust_remote_code") and not trust_remote_code:
        raise PermissionError(
            f"{run_dir / RUN_CONFIG} sets backbone.trust_remote_code: true: loading it would run Python code from "
            f"{cfg.backbone.get('name_or_path')!r}. If you trust this run and that model, ask for it yourself: "
            "load_model(run_dir, trust_remote_code=True), or imsm.evaluate / imsm.inspect ... trust_remote_code=true"
        )
    backbone, tokenizer = load_backbone(cfg.backbone, device=device)
    adapter_dir = run_dir / ADAPTER_DIR
    peft_model = adapter_kind(saved_peft_type(adapter_dir)).load(prepare_backbone(backbone), adapter_dir)
    peft_model.eval()
    meta = json.loads((run_dir / GATE_CONFIG).read_text())
    gate = gate_from_meta(meta, backbone.config.hidden_size)
    if gate is not None:
        if (run_dir / GATE_WEIGHTS).exists():
            gate.load_state_dict(load_file(str(run_dir / GATE_WEIGHTS)))
        gate.to(device=next(backbone.parameters()).device, dtype=torch.float32)
    model = IMSMModel(peft_model, gate, pooling=meta.get("pooling", "mean"))
    model.eval()
    return model, tokenizer
