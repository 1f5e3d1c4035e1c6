"""Where each backbone family keeps its last hidden state (after the final norm) and its output head.

IMSM mixes the two streams' last-layer states and applies the shared frozen head once. Transformers' own decoders
(Llama, Qwen2, Mistral, Gemma, ...) expose both the same way: ``get_decoder()`` returns a model whose
``last_hidden_state`` is already through the final norm, and ``get_output_embeddings()`` is the head. Gemma2/3
also soft-cap their logits after the head, so their head is wrapped to do the same. Remote-code families laid out
differently get a small adapter keyed by ``config.model_type`` (ChatGLM2/3: ``imsm.model.chatglm``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from transformers import DynamicCache

from imsm.model.attention import use_decode_attention
from imsm.model.chatglm import ChatGLMFamily


class Family(Protocol):
    """What ``IMSMModel`` needs from a backbone."""

    name: str
    batch_first: bool  # the backbone's layers see (batch, seq, d) inputs

    def prepare(self, model: nn.Module) -> None: ...

    def decoder(self, model: nn.Module) -> nn.Module: ...

    def head(self, model: nn.Module) -> nn.Module: ...

    def concat_caches(self, caches: list[Any]) -> Any: ...

    def last_hidden(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: object | None,
    ) -> torch.Tensor: ...


class SoftcappedHead(nn.Module):
    """``cap * tanh(head(h) / cap)``: Gemma2/3's final logit soft-capping, so mixed states get the same logits."""

    def __init__(self, head: nn.Module, cap: float):
        super().__init__()
        self.head = head
        self.cap = cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden) / self.cap) * self.cap


class DecoderFamily:
    """Transformers' decoder-only models: ``get_decoder()`` and ``get_output_embeddings()``."""

    name = "decoder"
    batch_first = True

    def prepare(self, model: nn.Module) -> None:
        """Decoding steps' attention on CPU without the flash kernel (``imsm.model.attention``); the rest fits."""
        use_decode_attention(model)

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.get_decoder()

    def head(self, model: nn.Module) -> nn.Module:
        head = model.get_output_embeddings()
        cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        return SoftcappedHead(head, cap) if cap else head

    def last_hidden(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: object | None,
    ) -> torch.Tensor:
        """(batch, seq, d) after the decoder's final norm."""
        out = self.decoder(model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def concat_caches(self, caches: list[DynamicCache]) -> DynamicCache:
        """One cache holding the rows of ``caches`` in order (all filled over the same prompt length)."""
        joined = caches[0]
        if len(caches) > 1:
            for i, layer in enumerate(joined.layers):
                layer.keys = torch.cat([c.layers[i].keys for c in caches])
                layer.values = torch.cat([c.layers[i].values for c in caches])
        return joined


GENERIC = DecoderFamily()
FAMILIES: dict[str, Family] = {"chatglm": ChatGLMFamily()}


def family_of(model: nn.Module) -> Family:
    """The adapter for ``model`` (a ``PreTrainedModel``), chosen by ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return FAMILIES.get(model_type, GENERIC)


def prepare_backbone(model: nn.Module) -> nn.Module:
    """Small, idempotent fix-ups a family needs before IMSM uses the backbone (see each family's ``prepare``)."""
    family_of(model).prepare(model)
    return model
