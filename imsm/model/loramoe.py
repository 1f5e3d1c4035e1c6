"""LoRAMoE (Dou et al. 2023): a mixture of LoRA experts in each feed-forward linear, with a localized balancing loss.

A baseline of the paper's Figure 3, rebuilt from the official code (github.com/Ablustrund/LoRAMoE, a fork of
peft 0.3 / transformers 4.30 that no longer runs), for peft has no such method:

- each targeted linear (``gate_proj``, ``up_proj``, ``down_proj``) gets its own router ``Linear(in, E, bias=False)``
  and E LoRA experts ``B_i A_i`` (rank r, no bias; B zero, A and the router Kaiming-uniform with a = sqrt(5));
- ``y = W x + alpha / r * sum_i w_i(x) B_i A_i drop_i(x)``, ``w = softmax(router(x))`` dense over the experts, in
  fp32, no top-k; ``drop_i``: the official loop draws a fresh dropout mask for each expert, so does this one;
- the localized balancing constraint (LBC) of one routed linear over a micro-batch: ``Q[m, n]`` = router weight of
  expert n summed over the tokens of sample m; ``I[m, n] = 1 + delta`` where (sample m is world knowledge,
  ``task_type`` 1, and n < E/2) or (``task_type`` 0 and n >= E/2), else ``1 - delta``; the term is
  ``beta * var(Z) / (mean(Z)^2 + 1e-10)``, ``Z = (I * Q)`` flattened, unbiased variance; summed over every routed
  linear and added to the language-model loss.

One deliberate difference: padding tokens do not count in ``Q`` (the official code sums every position, but trained
with one sample per device, so it never had padding; masking keeps a padded batch equal to that).

Plain module injection: each targeted ``nn.Linear`` is replaced by a ``LoRAMoELinear`` that holds it as
``base_layer`` and its experts under ``loramoe`` (parameter names contain ``.loramoe.``, the adapter's name).
``LoRAMoEModel`` wraps the backbone with the part of ``peft.PeftModel``'s surface that ``IMSMModel`` uses
(``get_base_model``, ``disable_adapter``, ``peft_config`` / ``active_adapter``, ``save_pretrained``,
``from_pretrained``), so the siamese model needs no special case: its frozen stream switches the experts off.

Routing weights reach the loss through the layers: each ``LoRAMoELinear`` keeps the router weights of its last
forward with the experts on (``last_routing``), and ``LoRAMoEModel.balance_loss`` reads them right after the
forward. The frozen stream runs with the experts off and records nothing. Under gradient checkpointing only the
non-reentrant kind keeps those weights in the graph; the reentrant kind runs the forward without gradients, so the
LBC would silently stop training the routers: ``balance_loss`` raises instead.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_NAME = "loramoe"  # the attribute holding each layer's experts, and the key of ``peft_config``
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FEEDFORWARD = ("gate_proj", "up_proj", "down_proj")
CV_EPS = 1e-10  # the official cv_squared's epsilon


class LoRAMoEType(str, Enum):
    """What ``config.peft_type`` says (a str enum like peft's ``PeftType``, so ``.value`` works the same)."""

    LORAMOE = "LORAMOE"


@dataclass
class LoRAMoEConfig:
    """LoRAMoE's settings; the defaults are the paper's (E 6, r 4, alpha 32, dropout 0.05, beta = delta = 0.1)."""

    num_experts: int = field(
        default=6, metadata={"help": "E, LoRA experts per routed linear (official lora_nums)"}
    )
    r: int = field(default=4, metadata={"help": "rank of each expert"})
    lora_alpha: float = field(default=32, metadata={"help": "experts are scaled by lora_alpha / r"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on each expert's input"})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "names of the linears that get experts; None: gate_proj, up_proj, down_proj"},
    )
    lbc_weight: float = field(
        default=0.1,
        metadata={"help": "beta, weight of the localized balancing constraint (official blc_weight)"},
    )
    lbc_delta: float = field(
        default=0.1,
        metadata={"help": "delta, the constraint's imbalance between the halves (official blc_alpha)"},
    )
    task_type: str | None = field(
        default="CAUSAL_LM", metadata={"help": "kept for peft-like configs; unused"}
    )
    peft_type: LoRAMoEType = field(default=LoRAMoEType.LORAMOE, init=False)

    def __post_init__(self) -> None:
        where = "LoRAMoE config (conf/peft/loramoe*.yaml)"
        if self.num_experts < 1 or self.r < 1:
            raise ValueError(f"{where}: num_experts={self.num_experts} and r={self.r} must both be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"{where}: lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.lbc_weight < 0 or not 0.0 <= self.lbc_delta < 1.0:
            raise ValueError(
                f"{where}: lbc_weight={self.lbc_weight} must be >= 0 and lbc_delta={self.lbc_delta} in [0, 1)"
            )
        if self.lbc_weight > 0 and self.num_experts % 2:
            raise ValueError(
                f"{where}: the localized balancing constraint splits the experts into two halves (world knowledge "
                f"and other tasks), so num_experts must be even; got num_experts={self.num_experts} with "
                f"lbc_weight={self.lbc_weight}. Use an even num_experts, or lbc_weight=0 to train without it."
            )
        self.target_modules = list(self.target_modules) if self.target_modules else list(FEEDFORWARD)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peft_type"] = self.peft_type.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoRAMoEConfig:
        d = dict(d)
        if d.pop("peft_type", LoRAMoEType.LORAMOE.value) != LoRAMoEType.LORAMOE.value:
            raise ValueError(f"not a LoRAMoE adapter config: peft_type={d.get('peft_type')!r}")
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# --- the layer -----------------------------------------------------------------------------------------------


class LoRAMoEExperts(nn.Module):
    """Router and E LoRA experts of one linear; kept in fp32 on a half-precision backbone, as peft keeps LoRA.

    Args:
        in_features, out_features: the wrapped linear's shape.
        num_experts, r, lora_alpha, lora_dropout: see ``LoRAMoEConfig``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.num_experts, self.r, self.scaling = num_experts, r, lora_alpha / r
        self.router = nn.Linear(in_features, num_experts, bias=False, device=device, dtype=dtype)
        # stacked experts, (E, r, in) and (E, out, r): one matmul for all of them when no dropout is drawn
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(lora_dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: every A_i and the router Kaiming-uniform (a = sqrt(5), nn.Linear's), every B_i zero."""
        with torch.no_grad():
            for i in range(self.num_experts):  # per expert: each A_i has nn.Linear's fan-in
                nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router weights (..., E) in fp32 and the experts' mixed update (..., out) in the experts' dtype."""
        x = x.to(self.lora_A.dtype)
        weights = F.softmax(self.router(x), dim=-1, dtype=torch.float32)
        # a fresh dropout mask per expert, as the official loop draws one per expert
        if self.training and self.dropout.p > 0:
            hidden = torch.stack(
                [self.dropout(x) @ self.lora_A[i].T for i in range(self.num_experts)], dim=-2
            )
        else:
            hidden = (x @ self.lora_A.flatten(0, 1).T).unflatten(-1, (self.num_experts, self.r))
        # w_i B_i A_i x = B_i (w_i A_i x): weight the rank-r states, then one matmul over all experts
        hidden = hidden * weights.unsqueeze(-1).to(hidden.dtype)
        update = hidden.flatten(-2) @ self.lora_B.permute(1, 0, 2).flatten(1).T
        return weights, update * self.scaling


class LoRAMoELinear(nn.Module):
    """A frozen ``nn.Linear`` plus its LoRAMoE experts; ``enabled=False`` gives the frozen linear exactly.

    Attributes:
        last_routing: router weights (batch, seq, E) of the last forward with the experts on, for the LBC.
    """

    def __init__(self, base_layer: nn.Linear, config: LoRAMoEConfig):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        experts = LoRAMoEExperts(
            base_layer.in_features,
            base_layer.out_features,
            config.num_experts,
            config.r,
            config.lora_alpha,
            config.lora_dropout,
            device=weight.device,
            dtype=dtype,
        )
        self.add_module(ADAPTER_NAME, experts)
        self.enabled = True
        self.last_routing: torch.Tensor | None = None

    @property
    def experts(self) -> LoRAMoEExperts:
        return getattr(self, ADAPTER_NAME)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen linear's weight (code that reads ``<proj>.weight`` keeps working, as with peft's layers)."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.enabled:
            return result
        weights, update = self.experts(x)
        self.last_routing = weights
        return (result + update).to(result.dtype)  # added in the experts' precision, as peft adds LoRA


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
