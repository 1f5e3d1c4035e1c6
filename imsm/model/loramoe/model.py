"""``LoRAMoEModel``: injection into a backbone, the ``peft.PeftModel`` surface, the balancing loss, save / load."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from imsm.model.loramoe.config import (
    ADAPTER_NAME,
    CONFIG_NAME,
    CV_EPS,
    FEEDFORWARD,
    WEIGHTS_NAME,
    LoRAMoEConfig,
    LoRAMoEType,
)
from imsm.model.loramoe.layer import LoRAMoELinear

# --- the balancing constraint -----------------------------------------------------------------------------------


def routing_importance(weights: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Q``: each sample's router weight per expert summed over its real tokens.

    Args:
        weights: (batch, seq, E) router weights.
        attention_mask: (batch, seq), 0 on padding (not counted); None counts every position.

    Returns:
        (batch, E) in fp32.
    """
    weights = weights.float()
    if attention_mask is None:
        return weights.sum(1)
    if attention_mask.shape != weights.shape[:2]:
        raise ValueError(
            f"LoRAMoE: routing weights {tuple(weights.shape)} do not match attention_mask "
            f"{tuple(attention_mask.shape)}; they must come from the forward on this batch"
        )
    return (weights * attention_mask.to(weights.dtype).unsqueeze(-1)).sum(1)


def cv_squared(z: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation ``var(z) / (mean(z)^2 + 1e-10)``, unbiased; 0 for a single value."""
    z = z.float().flatten()
    if z.numel() == 1:
        return z.new_zeros(())
    return z.var() / (z.mean() ** 2 + CV_EPS)


def localized_balance(importance: torch.Tensor, task_type: torch.Tensor, delta: float) -> torch.Tensor:
    """The LBC of one routed linear, unweighted: ``cv^2(I * Q)``.

    Args:
        importance: (batch, E) ``Q`` from ``routing_importance``; E even.
        task_type: (batch,) 1 for world-knowledge samples (their first E/2 experts' importance is scaled by
            1 + delta, the rest by 1 - delta), 0 for the others (the reverse).
        delta: the imbalance; 0 gives the plain importance ``cv^2(Q)``.
    """
    batch, n_experts = importance.shape
    if n_experts % 2:
        raise ValueError(
            f"LoRAMoE: the balancing constraint needs an even number of experts, got {n_experts}"
        )
    task_type = task_type.to(importance.device).reshape(-1)
    if task_type.numel() != batch:
        raise ValueError(f"LoRAMoE: task_type has {task_type.numel()} entries for a batch of {batch}")
    if not bool(((task_type == 0) | (task_type == 1)).all()):
        raise ValueError(f"LoRAMoE: task_type must be 0 or 1 per sample, got {task_type.tolist()}")
    first_half = torch.arange(n_experts, device=importance.device) < n_experts // 2
    # Z is most even when Q ~ 1 / I: at its minimum the up-weighted half gets (1 - delta) / (1 + delta) of the
    # other half's importance. This is the official arithmetic, kept as is.
    up = torch.where(task_type.unsqueeze(1) == 1, first_half, ~first_half)  # (batch, E)
    scale = torch.where(up, 1.0 + delta, 1.0 - delta).to(importance.dtype)
    return cv_squared(scale * importance)


# --- the model wrapper ------------------------------------------------------------------------------------------


def inject_loramoe(model: nn.Module, config: LoRAMoEConfig) -> list[LoRAMoELinear]:
    """Replace each ``nn.Linear`` named in ``config.target_modules`` by a ``LoRAMoELinear``; returns the new layers.

    A name matches as in peft: the module's full name or its last components (``mlp.down_proj``, ``down_proj``).
    """
    targets = list(config.target_modules or FEEDFORWARD)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if any(name == t or name.endswith(f".{t}") for t in targets)
    ]
    if not found:
        raise ValueError(f"Target modules {targets} not found in the base model ({type(model).__name__}).")
    layers = []
    for name, module in found:
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"LoRAMoE: target {name} is a {type(module).__name__}, only nn.Linear can get experts"
            )
        parent_name, _, child = name.rpartition(".")
        layer = LoRAMoELinear(module, config)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers.append(layer)
    return layers


class LoRAMoEModel(nn.Module):
    """A backbone with LoRAMoE injected, offering the ``PeftModel`` surface that ``IMSMModel`` relies on.

    Alone, ``forward`` is the backbone's and, as in the official model, adds the LBC to the loss when both
    ``labels`` and ``task_type`` are given. Under IMSM, ``IMSMTrainer.compute_loss`` adds it instead.

    Args:
        model: the transformers backbone; its own parameters are frozen here.
        config: the method's settings.
    """

    def __init__(self, model: nn.Module, config: LoRAMoEConfig):
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, LoRAMoEConfig] = {ADAPTER_NAME: config}
        self.active_adapter = ADAPTER_NAME
        for p in model.parameters():
            p.requires_grad_(False)
        inject_loramoe(model, config)
        for p in self.adapter_parameters().values():
            p.requires_grad_(True)

    def __getattr__(self, name: str) -> Any:
        """Anything else (``config``, ``generate``, checkpointing switches) is the backbone's, as with peft."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def loramoe_config(self) -> LoRAMoEConfig:
        return self.peft_config[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def routed_layers(self) -> list[LoRAMoELinear]:
        return [m for m in self.base_model.modules() if isinstance(m, LoRAMoELinear)]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Router and expert parameters by their name in the backbone (what ``save_pretrained`` writes)."""
        return {n: p for n, p in self.base_model.named_parameters() if f".{ADAPTER_NAME}." in n}

    def unload(self) -> nn.Module:
        """The backbone with every routed linear replaced by its frozen linear, experts dropped (peft's ``unload``)."""
        for name, module in list(self.base_model.named_modules()):
            if isinstance(module, LoRAMoELinear):
                parent, _, child = name.rpartition(".")
                setattr(
                    self.base_model.get_submodule(parent) if parent else self.base_model,
                    child,
                    module.base_layer,
                )
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Every routed linear runs as its frozen base linear (IMSM's frozen stream); restored on exit."""
        layers = self.routed_layers()
        before = [layer.enabled for layer in layers]
        for layer in layers:
            layer.enabled = False
        try:
            yield
        finally:
            for layer, was in zip(layers, before, strict=True):
                layer.enabled = was

    def balance_loss(
        self, task_type: torch.Tensor | None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``beta * sum`` over the routed linears of the LBC of the last forward with the experts on; 0 when
        ``beta = 0`` or ``task_type`` is None.

        Args:
            task_type: (batch,) 1 world knowledge, 0 other.
            attention_mask: (batch, seq) of that forward; padding is not counted.
        """
        config = self.loramoe_config
        layers = self.routed_layers()
        device = layers[0].experts.lora_A.device
        if task_type is None or config.lbc_weight == 0:
            return torch.zeros((), device=device)
        terms = []
        for layer in layers:
            weights = layer.last_routing
            if weights is None:
                raise RuntimeError(
                    "LoRAMoE: no routing weights recorded; run a forward with the experts on first"
                )
            trains = layer.training and torch.is_grad_enabled() and layer.experts.router.weight.requires_grad
            if trains and not weights.requires_grad:
                raise RuntimeError(
                    "LoRAMoE: the routing weights of the last forward carry no gradient, so the balancing "
                    "constraint would not train the routers. Reentrant gradient checkpointing does this (its "
                    "forward runs without gradients): use gradient_checkpointing_kwargs={'use_reentrant': False}; "
                    "or the forward ran under torch.no_grad()."
                )
            terms.append(
                localized_balance(routing_importance(weights, attention_mask), task_type, config.lbc_delta)
            )
        return config.lbc_weight * torch.stack(terms).sum()

    def forward(self, *args: Any, task_type: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The backbone's forward; ``loss`` gains the LBC when ``labels`` and ``task_type`` are both given."""
        out = self.base_model(*args, **kwargs)
        if (
            kwargs.get("labels") is not None
            and task_type is not None
            and getattr(out, "loss", None) is not None
        ):
            out.loss = out.loss + self.balance_loss(task_type, kwargs.get("attention_mask"))
        return out

    # --- save / load ------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, **_: Any) -> None:
        """``adapter_config.json`` + ``adapter_model.safetensors``: routers and experts only, never the backbone."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().contiguous().cpu() for n, p in self.adapter_parameters().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        meta = self.loramoe_config.to_dict()
        meta["base_model_name_or_path"] = getattr(
            getattr(self.base_model, "config", None), "_name_or_path", None
        )
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | Path, is_trainable: bool = False
    ) -> LoRAMoEModel:
        """Inject the saved adapter into ``model`` and load its weights (every one, strictly).

        ``is_trainable=False`` (peft's default) freezes the experts: a loaded adapter is for inference.
        """
        directory = Path(directory)
        config = LoRAMoEConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        wrapped = cls(model, config)
        saved = load_file(str(directory / WEIGHTS_NAME))
        params = wrapped.adapter_parameters()
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"{directory / WEIGHTS_NAME} does not fit this backbone: missing {missing[:3]} "
                f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})"
            )
        with torch.no_grad():
            for name, p in params.items():
                if saved[name].shape != p.shape:
                    raise ValueError(
                        f"{directory / WEIGHTS_NAME}: {name} has shape {tuple(saved[name].shape)}, "
                        f"the model expects {tuple(p.shape)}"
                    )
                p.copy_(saved[name])
                p.requires_grad_(is_trainable)
        return wrapped


def is_loramoe_adapter(directory: str | Path) -> bool:
    """Whether a saved adapter directory holds a LoRAMoE adapter (else a peft one)."""
    path = Path(directory) / CONFIG_NAME
    return path.exists() and json.loads(path.read_text()).get("peft_type") == LoRAMoEType.LORAMOE.value


def loramoe_model(peft_model: Any) -> LoRAMoEModel | None:
    """``IMSMModel.peft_model`` when it is LoRAMoE, else None."""
    return peft_model if isinstance(peft_model, LoRAMoEModel) else None
