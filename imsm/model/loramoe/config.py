"""LoRAMoE's settings (``LoRAMoEConfig``) and the names of its saved files; conf/peft/loramoe*.yaml name the class."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

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
