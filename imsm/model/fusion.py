"""Stream fusion: the frozen stream M and the tuned stream M' as one doubled batch.

During decoding each step is memory-bound (it reads every weight once for a handful of tokens), so running M on rows
``[:b]`` and M' on rows ``[b:]`` of one doubled batch reads the frozen weights once instead of twice. Inside
``adapter_on_second_half`` every adapted layer applies its frozen weight to all rows and its adapter to rows
``[b:]`` only (``imsm.model.fused_layers``: LoRA, DoRA, AdaLoRA, IA3, LoHa, LoRAMoE). ``imsm.model.decoding`` uses it
when ``can_fuse_streams`` holds; a model with any adapted module those functions do not cover exactly decodes in
two passes instead. The tokens are the same either way.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import nn

from imsm.model.adapters import AdapterModel
from imsm.model.families import Family
from imsm.model.fused_layers import HALF_FORWARDS, fusable


def can_fuse_streams(peft_model: AdapterModel, family: Family) -> bool:
    """True when both streams can run as one doubled batch, exactly.

    ChatGLM's layers see (seq, batch, d) inputs, whose rows are not the first dimension, so it runs two passes.
    """
    return family.batch_first and fused_layers(peft_model) is not None


def adapted_modules(peft_model: AdapterModel) -> list[nn.Module]:
    """The modules ``disable_adapter()`` switches: peft tuner layers and auxiliary wrappers (``modules_to_save``,
    trainable tokens), LoRAMoE layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    kinds = (BaseTunerLayer, AuxiliaryTrainingWrapper, *HALF_FORWARDS)
    return [m for m in peft_model.modules() if isinstance(m, kinds)]


def fused_layers(peft_model: AdapterModel) -> list[nn.Module] | None:
    """The adapted layers to split in halves, or None when one of them cannot be split exactly.

    Each must be of a class in ``imsm.model.fused_layers.HALF_FORWARDS`` and pass its ``fusable`` check; an
    auxiliary wrapper never does (its trained copy would run on the frozen rows too). No adapted module at all is
    None as well: there would be nothing to fuse.
    """
    layers = adapted_modules(peft_model)
    return layers if layers and all(fusable(m) for m in layers) else None


@contextlib.contextmanager
def adapter_on_second_half(peft_model: AdapterModel, batch: int) -> Iterator[None]:
    """Inside: a batch of 2b rows runs rows ``[:b]`` through the frozen model and ``[b:]`` with the adapter.

    For inference (decoding): it replaces each adapted layer's ``forward`` for the duration of the block.

    Args:
        peft_model: the adapter-carrying backbone (``IMSMModel.peft_model``).
        batch: b, the number of rows of each stream.

    Raises:
        ValueError: when the model cannot be fused exactly (``fused_layers`` is None), rather than run wrongly.
    """
    layers = fused_layers(peft_model)
    if layers is None:
        refused = sorted({type(m).__name__ for m in adapted_modules(peft_model) if not fusable(m)})
        raise ValueError(
            f"adapter_on_second_half: the doubled batch cannot split {refused or 'a model without adapted layers'} "
            f"exactly (it splits {sorted(k.__name__ for k in HALF_FORWARDS)}: unmerged, adapters on, LoRA without a "
            "variant or with DoRA); decode with fuse_streams=False"
        )
    try:
        for m in layers:
            # an instance attribute shadows the class's forward; hooks on the module still run
            m.forward = functools.partial(HALF_FORWARDS[type(m)], m, batch)
        yield
    finally:
        for m in layers:
            vars(m).pop("forward", None)
