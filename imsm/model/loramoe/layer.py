"""The routed expert layer: a frozen ``nn.Linear`` plus a router and E LoRA experts (``LoRAMoELinear``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from imsm.model.loramoe.config import ADAPTER_NAME, LoRAMoEConfig


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
