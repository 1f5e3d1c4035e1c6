"""One adapted layer, two streams: rows ``[:b]`` of a doubled batch as the frozen layer, rows ``[b:]`` adapted.

Each function here is the adapted branch of one layer type's ``forward`` (peft 0.21.2's, or LoRAMoE's), restricted
to the second half of the batch: the frozen weight is applied once to all 2b rows (the read that dominates a
memory-bound decoding step), and only the adapter's own work (an added delta, a rescaled output or input) is done
on rows ``[b:]``. Each mirrors its original line by line (the same casts, the same order of additions), so each half
equals what the layer computes in its own pass; rows ``[:b]`` are what the layer computes inside
``disable_adapter()``.

``HALF_FORWARDS`` maps a layer class to its function and ``fusable(layer)`` says when that function is exact for
this instance; ``imsm.model.fusion`` sends a model with any other adapted module to two passes.

Every function has the signature ``(layer, batch, x, *args, **kwargs) -> output``, b = ``batch``: ``x`` (2b, seq, in)
with the frozen stream's rows first; the output is (2b, seq, out).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.adalora import SVDLinear
from peft.tuners.ia3 import Linear as IA3Linear
from peft.tuners.loha import Linear as LoHaLinear
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn

from imsm.model.loramoe import LoRAMoELinear

HalfForward = Callable[..., torch.Tensor]


def lora_linear(layer: LoraLinear, batch: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """LoRA, and DoRA (the magnitude rescaling and the LoRA term) on rows ``[batch:]``: ``lora.Linear.forward``."""
    result = layer.base_layer(x, *args, **kwargs)
    x = x[batch:]
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        x = layer._cast_input_dtype(x, lora_A.weight.dtype)
        if name in layer.lora_variant:  # DoRA only (``fusable``); it reads the base output of these rows
            tuned = layer.lora_variant[name].forward(
                layer, active_adapter=name, x=x, result=result[batch:], **kwargs
            )
            result[batch:] = tuned.to(result.dtype)
        else:  # in place on the tuned rows' view: no copy of the half (``result[batch:] +=`` would copy it back)
            result[batch:].add_(
                (lora_B(lora_A(layer.lora_dropout[name](x))) * layer.scaling[name]).to(result.dtype)
            )
    return result


def adalora_linear(layer: SVDLinear, batch: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """AdaLoRA's SVD-form update ``B (A * E) x * scaling / ranknum`` on rows ``[batch:]``: ``SVDLinear.forward``."""
    result = layer.base_layer(x, *args, **kwargs)
    tuned, x = result[batch:], x[batch:]  # a view: the in-place additions below land in ``result``
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        lora_A, lora_B, lora_E = layer.lora_A[name], layer.lora_B[name], layer.lora_E[name]
        ranknum = layer.ranknum[name] + 1e-5
        x = layer._cast_input_dtype(x, lora_A.dtype)
        tuned += (
            (layer.lora_dropout[name](x) @ (lora_A * lora_E).T @ lora_B.T) * layer.scaling[name] / ranknum
        )
    return result


def ia3_linear(layer: IA3Linear, batch: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """(IA)^3 on rows ``[batch:]``: the input scaled (feed-forward layers) or the output scaled: ``ia3.Linear``."""
    previous = dtype = x.dtype
    scaling: Any = None
    for name in layer.active_adapters:
        if name not in layer.ia3_l:
            continue
        dtype = layer.ia3_l[name].dtype
        vector = layer.ia3_l[name].flatten()
        scaling = vector if scaling is None else scaling * vector  # peft starts from 1: the same values
    if scaling is None:  # no active vector here: peft multiplies by 1
        return layer.base_layer(x, *args, **kwargs)
    if layer.is_feedforward:
        # the scaled rows join the frozen ones in one matmul, so the weight is still read once
        tuned = (x[batch:].to(dtype) * scaling).to(previous)
        return layer.base_layer(torch.cat([x[:batch], tuned]), *args, **kwargs)
    result = layer.base_layer(x, *args, **kwargs)
    # in place on the tuned rows' view (one op instead of a product and a copy back): computed in the promoted
    # dtype and rounded once to the output's, as peft's ``(result * scaling).to(result.dtype)``
    result[batch:].mul_(scaling)
    return result


def loha_linear(layer: LoHaLinear, batch: int, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """LoHa's Hadamard-product update on rows ``[batch:]``: ``LoHaLayer.forward``."""
    previous = x.dtype
    result = layer.base_layer(x, *args, **kwargs)
    tuned = result[batch:]
    for name in layer.active_adapters:
        if name not in layer._available_adapters:
            continue
        # module dropout: one draw per adapter, as in the tuned stream's own pass
        if not layer.training or torch.rand(1) > layer.module_dropout[name]:
            tuned = tuned + layer._get_delta_activations(name, x[batch:], *args, **kwargs)
    result = result.to(previous)  # peft casts the whole output, in the frozen pass too
    result[batch:] = tuned.to(previous)
    return result


def loramoe_linear(layer: LoRAMoELinear, batch: int, x: torch.Tensor) -> torch.Tensor:
    """LoRAMoE's routed experts on rows ``[batch:]``; the frozen rows run with the experts off."""
    result = layer.base_layer(x)
    weights, update = layer.experts(x[batch:])
    layer.last_routing = weights  # what the tuned stream's own pass records
    result[batch:].add_(
        update
    )  # in the promoted dtype, rounded once to the output's: ``(result + update).to(...)``
    return result


HALF_FORWARDS: dict[type[nn.Module], HalfForward] = {
    LoraLinear: lora_linear,
    SVDLinear: adalora_linear,
    IA3Linear: ia3_linear,
    LoHaLinear: loha_linear,
    LoRAMoELinear: loramoe_linear,
}


def fusable(layer: nn.Module) -> bool:
    """True when ``HALF_FORWARDS`` has this exact class and its function is exact for this instance.

    Not exact: a subclass (quantised layers override ``forward``), merged adapter weights (the frozen rows would
    carry them), adapters switched off (the tuned rows would not), a LoRA variant other than DoRA, an instance whose
    ``forward`` is already replaced (another fusion in progress), LoRAMoE experts switched off.
    """
    kind = type(layer)
    if kind not in HALF_FORWARDS or "forward" in vars(layer):
        return False
    if kind is LoRAMoELinear:
        return layer.enabled
    if layer.merged or layer.disable_adapters:
        return False
    if kind is LoraLinear:
        variants = [layer.lora_variant[a] for a in layer.active_adapters if a in layer.lora_variant]
        return all(type(v) is DoraLinearVariant for v in variants)
    return True
