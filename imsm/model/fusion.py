"""Stream fusion: the frozen stream M and the tuned stream M' as one doubled batch.

During decoding each step is memory-bound (it reads every weight once for a handful of tokens), so running M on rows
``[:b]`` and M' on rows ``[b:]`` of one doubled batch reads the frozen weights once instead of twice. This needs the
adapter switched off on the first half and on for the second half inside each adapted layer, which only peft's LoRA
layers allow. ``imsm.model.decoding`` uses it; the tokens are the same either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from imsm.model.adapters import AdapterModel
from imsm.model.families import Family


def can_fuse_streams(peft_model: AdapterModel, family: Family) -> bool:
    """True when both streams can run as one doubled batch (peft's per-row adapter selection).

    peft 0.21 supports ``adapter_names`` (with ``"__base__"`` for the frozen model) for plain LoRA; it raises for
    DoRA and has no hook for the other methods, which then run as two separate streams. ChatGLM's layers see
    (seq, batch, d) inputs, which peft's per-row selection cannot split.
    """
    config = peft_model.peft_config.get(peft_model.active_adapter)
    return (
        family.batch_first
        and config is not None
        and getattr(config, "peft_type", None) is not None
        and config.peft_type.value == "LORA"
        and not getattr(config, "use_dora", False)
        and hasattr(peft_model.base_model, "_enable_peft_forward_hooks")
        and only_plain_lora_linears(peft_model)
    )


def only_plain_lora_linears(peft_model: AdapterModel) -> bool:
    """True when every adapted module is a plain ``lora.Linear`` of the active adapter (no variant such as DoRA).

    Fusion is exact only for those (``adapter_on_second_half``). A LoRA embedding, a ``modules_to_save`` copy or
    trainable tokens would run on the frozen half too, so one such module sends the whole model to two passes.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    active = peft_model.active_adapter
    for m in peft_model.modules():
        if isinstance(m, AuxiliaryTrainingWrapper):
            return False
        if isinstance(m, BaseTunerLayer) and (type(m) is not LoraLinear or active in m.lora_variant):
            return False
    return True


@contextlib.contextmanager
def adapter_on_second_half(peft_model: Any, batch: int) -> Iterator[None]:
    """Inside: a batch of 2b rows runs rows ``[:b]`` through the frozen model and ``[b:]`` with the adapter.

    Plain LoRA linears add ``B(A(x[b:])) * scaling`` to ``out[b:]`` only: contiguous halves, no per-layer index
    lists. Anything else uses peft's own per-row selection (``adapter_names``), which builds index lists and
    gathers / scatters rows in every layer.

    Args:
        peft_model: a ``peft.PeftModel`` for which ``can_fuse_streams`` holds.
        batch: b, the number of rows of each stream.
    """
    from peft.tuners.lora import Linear as LoraLinear

    active = peft_model.active_adapter
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    plain = all(
        type(m) is LoraLinear
        and active in m.lora_A
        and active not in m.lora_variant
        and not m.merged
        and "forward" not in vars(m)
        for m in layers
    )
    if not layers or not plain:
        names = ["__base__"] * batch + [active] * batch
        with peft_model._enable_peft_forward_hooks(adapter_names=names):
            yield
        return

    def half_forward(layer: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = layer.base_layer(x, *args, **kwargs)
        tuned = x[batch:].to(layer.lora_A[active].weight.dtype)
        delta = layer.lora_B[active](layer.lora_A[active](layer.lora_dropout[active](tuned)))
        out[batch:] += (delta * layer.scaling[active]).to(out.dtype)
        return out

    try:
        for m in layers:
            m.forward = half_forward.__get__(m)  # an instance attribute shadows the class's forward
        yield
    finally:
        for m in layers:
            vars(m).pop("forward", None)
