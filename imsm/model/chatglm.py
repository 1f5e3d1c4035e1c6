"""ChatGLM3: the family adapter, and a stand-in with the same module tree for offline tests and the dry run.

ChatGLM3-6B (``THUDM/chatglm3-6b``) ships only as remote code, laid out unlike transformers' own decoders:

- ``transformer`` (ChatGLMModel) takes ``input_ids, position_ids, attention_mask, past_key_values, use_cache`` and
  returns ``last_hidden_state`` in **(seq, batch, d)** layout, already through ``transformer.encoder.final_layernorm``;
- the head is ``transformer.output_layer`` (there is no ``get_output_embeddings``);
- its KV cache is a tuple of per-layer ``(key, value)`` tensors, returned as ``past_key_values`` (it ignores
  ``transformers.Cache`` objects).

``ChatGLMFamily`` turns that into what ``IMSMModel`` expects: (batch, seq, d) states, the head, and a cache that
lives on the stream's cache object (the tuple is kept under ``LEGACY_PAST``). ``prepare`` aliases the config's
``num_layers`` as ``num_hidden_layers``, which ``transformers.DynamicCache(config=...)`` reads. Its layers see
(seq, batch, d) inputs (``batch_first = False``), so peft's per-row adapter selection cannot fuse the two streams.

The real remote code cannot be loaded offline, so ``ChatGLMStandIn`` re-creates its module tree with the same names
and linear shapes (``query_key_value`` with bias and multi-query groups, ``dense``, ``mlp.dense_h_to_4h`` with the
SwiGLU double width, ``mlp.dense_4h_to_h``, ``encoder.final_layernorm``, ``output_layer``), its (seq, batch, d)
layout and its tuple cache. It omits rotary position embeddings (positions do not change any shape or the
adapter's plumbing). Target-module matching and parameter counts on it equal those on the real model; the adapter
tests run on it; the dry run builds it on the meta device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel

LEGACY_PAST = "imsm_legacy_past"


class ChatGLMFamily:
    """Last hidden state and head of a ChatGLM2/3 model (remote code, or ``ChatGLMStandIn``)."""

    name = "chatglm"
    batch_first = (
        False  # layers see (seq, batch, d): the fused streams' row halves are not dim 0 (two passes)
    )

    def prepare(self, model: nn.Module) -> None:
        """Alias ``num_hidden_layers`` to ChatGLM's ``num_layers``: ``DynamicCache(config=...)`` reads it."""
        config = model.config
        if getattr(config, "num_hidden_layers", None) is None:
            config.num_hidden_layers = config.num_layers

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.transformer

    def head(self, model: nn.Module) -> nn.Module:
        return model.transformer.output_layer

    def last_hidden(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: object | None,
    ) -> torch.Tensor:
        """(batch, seq, d) states after ``encoder.final_layernorm``; the tuple cache rides on ``cache``."""
        past = getattr(cache, LEGACY_PAST, None) if cache is not None else None
        out = model.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past,
            use_cache=cache is not None,
            return_dict=True,
        )
        if cache is not None:
            setattr(cache, LEGACY_PAST, out.past_key_values)
        return out.last_hidden_state.transpose(0, 1)  # (seq, batch, d) -> (batch, seq, d)

    def concat_caches(self, caches: list[object]) -> object:
        """One cache holding the rows of ``caches`` in order: per layer, keys and values (seq, batch, ...)."""
        joined = caches[0]
        if len(caches) > 1:
            pasts = [getattr(c, LEGACY_PAST) for c in caches]  # per chunk: per layer (key, value)
            layers = range(len(pasts[0]))
            joined_past = tuple(
                tuple(torch.cat([p[i][kv] for p in pasts], dim=1) for kv in (0, 1)) for i in layers
            )
            setattr(joined, LEGACY_PAST, joined_past)
        return joined


class ChatGLMStandInConfig(PretrainedConfig):
    """The fields of ChatGLM3's ``config.json`` that fix module names and shapes (defaults: chatglm3-6b)."""

    model_type = "chatglm"

    def __init__(
        self,
        hidden_size: int = 4096,
        num_layers: int = 28,
        num_attention_heads: int = 32,
        kv_channels: int = 128,
        multi_query_group_num: int = 2,
        ffn_hidden_size: int = 13696,
        padded_vocab_size: int = 65024,
        add_qkv_bias: bool = True,
        add_bias_linear: bool = False,
        layernorm_epsilon: float = 1e-5,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.kv_channels = kv_channels
        self.multi_query_group_num = multi_query_group_num
        self.ffn_hidden_size = ffn_hidden_size
        self.padded_vocab_size = padded_vocab_size
        self.add_qkv_bias = add_qkv_bias
        self.add_bias_linear = add_bias_linear
        self.layernorm_epsilon = layernorm_epsilon
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class _RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x.float() * torch.rsqrt(var + self.eps))).to(x.dtype)


class _SelfAttention(nn.Module):
    def __init__(self, c: ChatGLMStandInConfig):
        super().__init__()
        self.heads, self.groups, self.head_dim = c.num_attention_heads, c.multi_query_group_num, c.kv_channels
        projection = c.kv_channels * c.num_attention_heads
        self.query_key_value = nn.Linear(
            c.hidden_size, projection + 2 * c.kv_channels * c.multi_query_group_num, bias=c.add_qkv_bias
        )
        self.dense = nn.Linear(projection, c.hidden_size, bias=c.add_bias_linear)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: tuple | None, use_cache: bool):
        # x: (seq, batch, d); mask: (batch, 1, seq, past + seq), True where attention is allowed
        s, b, _ = x.shape
        q, k, v = self.query_key_value(x).split(
            [self.heads * self.head_dim, self.groups * self.head_dim, self.groups * self.head_dim], dim=-1
        )
        q = q.view(s, b, self.heads, self.head_dim)
        k = k.view(s, b, self.groups, self.head_dim)
        v = v.view(s, b, self.groups, self.head_dim)
        if past is not None:
            k, v = torch.cat([past[0], k], 0), torch.cat([past[1], v], 0)
        present = (k, v) if use_cache else None
        rep = self.heads // self.groups
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1)
        ctx = (probs @ v).permute(2, 0, 1, 3).reshape(s, b, -1)
        return self.dense(ctx), present


class _MLP(nn.Module):
    def __init__(self, c: ChatGLMStandInConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(c.hidden_size, 2 * c.ffn_hidden_size, bias=c.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(c.ffn_hidden_size, c.hidden_size, bias=c.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(a) * b)


class _GLMBlock(nn.Module):
    def __init__(self, c: ChatGLMStandInConfig):
        super().__init__()
        self.input_layernorm = _RMSNorm(c.hidden_size, c.layernorm_epsilon)
        self.self_attention = _SelfAttention(c)
        self.post_attention_layernorm = _RMSNorm(c.hidden_size, c.layernorm_epsilon)
        self.mlp = _MLP(c)

    def forward(self, x, mask, past, use_cache):
        attn, present = self.self_attention(self.input_layernorm(x), mask, past, use_cache)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), present


class _Encoder(nn.Module):
    def __init__(self, c: ChatGLMStandInConfig):
        super().__init__()
        self.layers = nn.ModuleList(_GLMBlock(c) for _ in range(c.num_layers))
        self.final_layernorm = _RMSNorm(c.hidden_size, c.layernorm_epsilon)


class _Embedding(nn.Module):
    def __init__(self, c: ChatGLMStandInConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.padded_vocab_size, c.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(input_ids).transpose(0, 1)  # ChatGLM's (seq, batch, d)


class _Transformer(nn.Module):
    """ChatGLMModel's interface: ``(input_ids, position_ids, attention_mask, past_key_values, use_cache)``."""

    def __init__(self, c: ChatGLMStandInConfig):
        super().__init__()
        self.embedding = _Embedding(c)
        self.encoder = _Encoder(c)
        self.output_layer = nn.Linear(c.hidden_size, c.padded_vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,  # accepted like the original; no rotary here
        attention_mask: torch.Tensor | None = None,
        past_key_values: tuple | None = None,
        use_cache: bool = False,
        return_dict: bool = True,
    ):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        b, s = input_ids.shape
        past_len = past_key_values[0][0].shape[0] if past_key_values else 0
        if attention_mask is None:
            attention_mask = input_ids.new_ones(b, past_len + s)
        causal = torch.ones(s, past_len + s, dtype=torch.bool, device=input_ids.device).tril(past_len)
        mask = (causal[None] & attention_mask.bool()[:, None, :])[:, None]  # (batch, 1, seq, past + seq)
        x = self.embedding(input_ids)
        presents = []
        for i, layer in enumerate(self.encoder.layers):
            x, present = layer(x, mask, past_key_values[i] if past_key_values else None, use_cache)
            presents.append(present)
        x = self.encoder.final_layernorm(x)
        return BaseModelOutputWithPast(
            last_hidden_state=x, past_key_values=tuple(presents) if use_cache else None
        )


class ChatGLMStandIn(PreTrainedModel, GenerationMixin):
    """ChatGLMForConditionalGeneration's module tree and shapes (see the module docstring for what it omits)."""

    config_class = ChatGLMStandInConfig
    base_model_prefix = "transformer"

    def __init__(self, config: ChatGLMStandInConfig):
        super().__init__(config)
        self.transformer = _Transformer(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.embedding.word_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Logits (batch, seq, vocab), as the original: ``output_layer`` on the (seq, batch, d) states, transposed."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = self.transformer(input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.transformer.output_layer(out.last_hidden_state).transpose(0, 1)
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)
