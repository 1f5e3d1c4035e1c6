"""What the siamese model needs from an adapter-carrying backbone, and how each kind is attached and loaded back.

``IMSMModel`` runs one backbone twice: with the adapter (the tuned stream M') and inside ``disable_adapter()`` (the
frozen stream M). Any wrapper offering ``AdapterModel`` works: peft's ``PeftModel`` (LoRA, IA3, AdaLoRA, DoRA, LoHa,
...) and ``imsm.model.loramoe.LoRAMoEModel`` (not a peft method) do. Both save a directory holding
``adapter_config.json`` whose ``peft_type`` names the kind; ``ADAPTER_KINDS`` maps it to the code that attaches a
fresh adapter and loads a saved one, with peft's own functions for every other ``peft_type`` (as
``imsm.model.families`` maps ``model_type`` to a family). A new kind is one class and one entry here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from peft import PeftModel, get_peft_model
from torch import nn

from imsm.model.loramoe import CONFIG_NAME, LoRAMoEModel, LoRAMoEType


@runtime_checkable
class AdapterModel(Protocol):
    """The surface of ``peft.PeftModel`` that ``IMSMModel``, the trainer and the checkpoint code use.

    ``isinstance(x, AdapterModel)`` checks that every member exists (not their signatures).
    """

    peft_config: dict[str, Any]  # adapter name -> its config; ``peft_type.value`` names the kind
    active_adapter: str  # the trained adapter's name; its parameter names contain ``.<name>.``
    base_model: nn.Module  # peft: the tuner wrapping the backbone; LoRAMoE: the backbone itself

    def get_base_model(self) -> nn.Module:
        """The transformers backbone (with the adapter's layers injected)."""
        ...

    def disable_adapter(self) -> AbstractContextManager[None]:
        """Inside: the backbone computes exactly as without the adapter (the frozen stream M)."""
        ...

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """``adapter_config.json`` (with ``peft_type``) + the adapter's weights only, never the backbone's."""
        ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]: ...

    def modules(self) -> Iterator[nn.Module]: ...


@dataclass(frozen=True)
class AdapterKind:
    """How one kind of adapter is attached to a fresh backbone and loaded back from its saved directory.

    Attributes:
        attach: ``(backbone, config) -> AdapterModel``, a fresh trainable adapter.
        load: ``(backbone, directory) -> AdapterModel``, a saved adapter, frozen (for inference).
    """

    attach: Callable[[nn.Module, Any], AdapterModel]
    load: Callable[[nn.Module, Path], AdapterModel]


PEFT = AdapterKind(attach=get_peft_model, load=PeftModel.from_pretrained)
ADAPTER_KINDS: dict[str, AdapterKind] = {
    LoRAMoEType.LORAMOE.value: AdapterKind(attach=LoRAMoEModel, load=LoRAMoEModel.from_pretrained),
}


def peft_type_of(config: Any) -> str | None:
    """The ``peft_type`` name of an adapter config (``"LORA"``, ``"LORAMOE"``, ...), None when it has none."""
    peft_type = getattr(config, "peft_type", None)
    return getattr(peft_type, "value", peft_type)


def saved_peft_type(directory: str | Path) -> str | None:
    """The ``peft_type`` written in a saved adapter's ``adapter_config.json``; None when the file is absent."""
    path = Path(directory) / CONFIG_NAME
    return json.loads(path.read_text()).get("peft_type") if path.exists() else None


def adapter_kind(peft_type: str | None) -> AdapterKind:
    """The entry of ``ADAPTER_KINDS`` for ``peft_type``; peft's own functions for any other type."""
    return ADAPTER_KINDS.get(peft_type or "", PEFT)
