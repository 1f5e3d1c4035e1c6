"""The siamese model: one backbone, two streams, a gate, the shared frozen head.

``IMSMModel`` wraps a ``peft.PeftModel`` (the backbone with an injected adapter) and a gate. The frozen stream M is
the *same* module run inside ``peft_model.disable_adapter()`` without gradients; the tuned stream M' runs with the
adapter. Both return the decoder's last hidden state (after the final norm); full-vocabulary logits are only ever
computed once, on the mixed state, and in training only at the response positions that carry a label.

Training (``forward``): ``h = g * h_M + (1 - g) * h_M'``, ``logits = lm_head(h)``, cross-entropy on the response.
Generation (``generate``): both streams keep their own KV cache; the query means are computed once at prefill.
``gate=None`` is plain PEFT through the same code (only the tuned stream runs), so comparisons are fair.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import DynamicCache
from transformers.utils import ModelOutput

from imsm.model.families import Family, family_of
from imsm.model.gate import FixedGate, LowRankGate

IGNORE_INDEX = -100
STREAMS = ("imsm", "base", "tuned")


def pool_query(hidden: torch.Tensor, query_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Summarise the prompt tokens of each row.

    Args:
        hidden: (batch, seq, d) hidden states.
        query_mask: (batch, seq), 1 on prompt tokens, 0 on response and padding (any padding side).
        pooling: ``mean`` (the paper) or ``max``.

    Returns:
        (batch, d) summary of each row's prompt tokens.
    """
    mask = query_mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if pooling == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
    raise ValueError(f"gate.pooling={pooling!r} is not one of ['mean', 'max']")


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding safe). (batch, seq)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@dataclass
class IMSMOutput(ModelOutput):
    """What ``IMSMModel.forward`` returns; ``loss`` is None without labels, ``logits`` only on request."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class IMSMModel(nn.Module):
    """Siamese LLM: frozen stream + tuned stream + gate over a single copy of the backbone weights.

    Args:
        peft_model: the backbone with its adapter injected (``peft.get_peft_model`` / ``PeftModel.from_pretrained``).
        gate: a gate module from ``imsm.model.gate.build_gate`` or None for plain PEFT.
        pooling: query summary, ``mean`` (paper) or ``max``.
    """

    def __init__(self, peft_model: PeftModel, gate: nn.Module | None, pooling: str = "mean"):
        super().__init__()
        self.peft_model = peft_model
        self.gate = gate
        self.pooling = pooling
        self.config = peft_model.get_base_model().config  # HF Trainer and accelerate look for it

    # --- pieces of the backbone -------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.peft_model.get_base_model()

    @property
    def family(self) -> Family:
        """Where this architecture keeps its post-norm last hidden state and head (``imsm.model.families``)."""
        return family_of(self.backbone)

    @property
    def decoder(self) -> nn.Module:
        return self.family.decoder(self.backbone)

    @property
    def lm_head(self) -> nn.Module:
        return self.family.head(self.backbone)

    @property
    def uses_frozen_stream(self) -> bool:
        return self.gate is not None

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Run the backbone as the frozen model M: adapter off, no gradients."""
        with torch.no_grad(), self.peft_model.disable_adapter():
            yield

    def stream_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        adapter: bool,
        position_ids: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states after the final norm, (batch, seq, d), of M (adapter=False) or M'."""
        ctx = contextlib.nullcontext() if adapter else self.frozen()
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        with ctx:
            return self.family.last_hidden(self.backbone, input_ids, attention_mask, position_ids, cache)

    def mix(
        self,
        base_hidden: torch.Tensor | None,
        tuned_hidden: torch.Tensor,
        base_query: torch.Tensor | None = None,
        tuned_query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``g * h_M + (1 - g) * h_M'`` in the backbone's dtype; the tuned state alone when there is no gate."""
        if self.gate is None:
            return tuned_hidden
        g = self.gate(base_hidden, tuned_hidden, base_query, tuned_query)
        mixed = g * base_hidden.float() + (1.0 - g) * tuned_hidden.float()
        return mixed.to(tuned_hidden.dtype)

    def _streams(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        tuned = self.stream_hidden(input_ids, attention_mask, adapter=True)
        if self.gate is None:
            return None, tuned, None, None
        base = self.stream_hidden(input_ids, attention_mask, adapter=False)
        if not getattr(self.gate, "needs_query", False):
            return base, tuned, None, None
        if query_mask is None:
            raise ValueError("the query-aware gate needs `query_mask` (1 on prompt tokens) in the batch")
        return (
            base,
            tuned,
            pool_query(base, query_mask, self.pooling),
            pool_query(tuned, query_mask, self.pooling),
        )

    def mixed_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mixed last-layer state at every position, (batch, seq, d)."""
        base, tuned, bq, tq = self._streams(input_ids, attention_mask, query_mask)
        return self.mix(base, tuned, bq, tq)

    # --- training -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = False,
        task_type: torch.Tensor | None = None,
    ) -> IMSMOutput:
        """Loss on response tokens (and optionally logits at every position).

        Args:
            input_ids, attention_mask: (batch, seq).
            query_mask: (batch, seq), 1 on prompt tokens.
            labels: (batch, seq), ``-100`` on prompt and padding; position t is predicted from t-1.
            return_logits: also return (batch, seq, vocab) logits (tests and debugging; costly).
            task_type: (batch,) per-row task type from the collator; unused here: ``IMSMTrainer.compute_loss``
                reads it from the batch for LoRAMoE's balancing loss, which needs the routing of this forward.
        """
        base, tuned, bq, tq = self._streams(input_ids, attention_mask, query_mask)
        logits = self.lm_head(self.mix(base, tuned, bq, tq)) if return_logits else None
        loss = None
        if labels is not None:
            # Only positions whose next token is a response label need the head: a few % of the full logits.
            target = labels[:, 1:]
            rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)

            def at_labels(t: torch.Tensor | None, per_row: bool = False) -> torch.Tensor | None:
                # (batch, seq, d) -> (n, d) at the labelled positions; (batch, d) query summaries -> their rows
                return None if t is None else (t[rows] if per_row else t[:, :-1][rows, cols])

            mixed = self.mix(at_labels(base), at_labels(tuned), at_labels(bq, True), at_labels(tq, True))
            token_logits = self.lm_head(mixed).float()
            loss = F.cross_entropy(token_logits, target[rows, cols], reduction="mean")
        return IMSMOutput(loss=loss, logits=logits)

    # --- generation ---------------------------------------------------------------------------------------
    def can_fuse_streams(self) -> bool:
        """True when both streams can run as one doubled batch (peft's per-row adapter selection).

        peft 0.21 supports ``adapter_names`` (with ``"__base__"`` for the frozen model) for plain LoRA; it raises for
        DoRA and has no hook for the other methods, which then run as two separate streams. ChatGLM's layers see
        (seq, batch, d) inputs, which peft's per-row selection cannot split.
        """
        config = self.peft_model.peft_config.get(self.peft_model.active_adapter)
        return (
            self.family.batch_first
            and config is not None
            and getattr(config, "peft_type", None) is not None
            and config.peft_type.value == "LORA"
            and not getattr(config, "use_dora", False)
            and hasattr(self.peft_model.base_model, "_enable_peft_forward_hooks")
        )

    @contextlib.contextmanager
    def adapter_on_second_half(self, batch: int) -> Iterator[None]:
        """Inside: a batch of 2b rows runs rows ``[:b]`` through the frozen model and ``[b:]`` with the adapter.

        Plain LoRA linears add ``B(A(x[b:])) * scaling`` to ``out[b:]`` only: contiguous halves, no per-layer
        index lists. Anything else uses peft's own per-row selection (``adapter_names``), which builds index lists
        and gathers / scatters rows in every layer.
        """
        from peft.tuners.lora import Linear as LoraLinear

        active = self.peft_model.active_adapter
        layers = [m for m in self.peft_model.modules() if isinstance(m, LoraLinear)]
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
            with self.peft_model._enable_peft_forward_hooks(adapter_names=names):
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

    def _prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        *,
        adapter: bool,
        rows: int,
    ) -> tuple[torch.Tensor, object]:
        """One stream over the prompts, ``rows`` at a time: its (batch, prompt_len, d) states and a filled cache."""
        hidden, caches = [], []
        for start in range(0, input_ids.shape[0], rows):
            chunk = slice(start, start + rows)
            caches.append(DynamicCache(config=self.config))
            hidden.append(
                self.stream_hidden(
                    input_ids[chunk],
                    attention_mask[chunk],
                    adapter=adapter,
                    position_ids=positions[chunk],
                    cache=caches[-1],
                )
            )
        return torch.cat(hidden), self.family.concat_caches(caches)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | list[int],
        pad_token_id: int,
        streams: str = "imsm",
        fuse_streams: bool | None = None,
        stop_check_every: int | None = None,
        prefill_tokens: int | None = None,
    ) -> torch.Tensor:
        """Batched greedy decoding with a KV cache per stream.

        Args:
            input_ids, attention_mask: (batch, prompt_len), **left**-padded prompts; every real token is query.
            max_new_tokens: decoding budget.
            eos_token_id: id(s) that end a row; that row then emits ``pad_token_id``.
            streams: ``imsm`` (the model as configured), ``base`` (frozen model M alone), ``tuned`` (M' alone).
            fuse_streams: run M and M' as one doubled batch (rows ``[:b]`` adapter off, ``[b:]`` on), so each
                step reads the frozen weights once. None: whenever ``can_fuse_streams()``. Same tokens either way.
            stop_check_every: test "all rows ended" every k steps; each test is a host-device sync on a GPU.
                None: 1 on CPU, 8 on GPU.
            prefill_tokens: each stream reads the prompts in row chunks of about this many tokens, then the chunks'
                caches are joined for decoding (a long prompt's activations and attention scores stay small;
                measured on 2 CPU cores, the 96 longest MultiRC prompts, batch 32: one forward 1.6-2x slower than
                chunks of 8). None: 4096 on CPU, 32768 on GPU.

        Returns:
            (batch, n_new) new token ids, n_new <= max_new_tokens, ``pad_token_id`` after each row's EOS.
        """
        if streams not in STREAMS:
            raise ValueError(f"streams={streams!r} is not one of {list(STREAMS)}")
        if attention_mask[:, -1].min() == 0:
            raise ValueError("generate() needs left-padded prompts (the last column must be real tokens)")
        mixing = streams == "imsm" and self.gate is not None
        fuse = mixing and (self.can_fuse_streams() if fuse_streams is None else fuse_streams)
        device = input_ids.device
        check_every = stop_check_every or (8 if device.type == "cuda" else 1)
        eos = torch.tensor(
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device
        )
        batch, prompt_len = input_ids.shape

        # One attention mask for the whole run, sliced per step (no re-allocation in the loop).
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, max_new_tokens)], dim=1)
        positions = positions_from_mask(attention_mask)
        if fuse:
            full_mask = torch.cat([full_mask, full_mask])
            hooks = self.adapter_on_second_half(batch)
        else:
            hooks = contextlib.nullcontext()
        # Prefill each stream on its own (prompts are compute-bound: a doubled batch saves nothing there), then
        # decode both as one doubled batch over the joined caches when fused.
        rows = max(1, (prefill_tokens or (32768 if device.type == "cuda" else 4096)) // prompt_len)
        prefill = functools.partial(self._prefill, input_ids, attention_mask, positions, rows=rows)
        base, base_cache = prefill(adapter=False) if mixing or streams == "base" else (None, None)
        tuned, tuned_cache = prefill(adapter=True) if streams != "base" else (None, None)
        caches = (
            {"both": self.family.concat_caches([base_cache, tuned_cache])}
            if fuse
            else {"base": base_cache, "tuned": tuned_cache}
        )

        def step(
            ids: torch.Tensor, length: int, pos: torch.Tensor
        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
            if fuse:
                both = self.stream_hidden(
                    torch.cat([ids, ids]),
                    full_mask[:, :length],
                    adapter=True,
                    position_ids=torch.cat([pos, pos]),
                    cache=caches["both"],
                )
                return both[:batch], both[batch:]
            out = {}
            for name, adapter in (("base", False), ("tuned", True)):
                if caches[name] is not None:
                    out[name] = self.stream_hidden(
                        ids, full_mask[:, :length], adapter=adapter, position_ids=pos, cache=caches[name]
                    )
            return out.get("base"), out.get("tuned")

        out = []
        with hooks:
            bq = tq = None
            if mixing and getattr(self.gate, "needs_query", False):
                bq = pool_query(base, attention_mask, self.pooling)  # computed once: the prompt never changes
                tq = pool_query(tuned, attention_mask, self.pooling)
            finished = torch.zeros(batch, dtype=torch.bool, device=device)
            pad = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
            last_pos = positions[:, -1:]
            for i in range(max_new_tokens):
                if mixing:
                    h = self.mix(base[:, -1], tuned[:, -1], bq, tq)
                else:
                    h = (base if streams == "base" else tuned)[:, -1]
                next_tok = torch.where(finished, pad, self.lm_head(h).argmax(-1))
                out.append(next_tok)
                finished |= torch.isin(next_tok, eos)
                if i + 1 == max_new_tokens or ((i + 1) % check_every == 0 and bool(finished.all())):
                    break
                last_pos = last_pos + 1
                base, tuned = step(next_tok.unsqueeze(1), prompt_len + i + 1, last_pos)
        return torch.stack(out, dim=1)

    # --- bookkeeping --------------------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, int]:
        """Trainable counts: ``adapter`` (the PEFT method), ``gate``, ``total``."""
        adapter = sum(p.numel() for p in self.peft_model.parameters() if p.requires_grad)
        gate = 0 if self.gate is None else sum(p.numel() for p in self.gate.parameters() if p.requires_grad)
        return {"adapter": adapter, "gate": gate, "total": adapter + gate}

    def check_trainable(self) -> None:
        """Assert that only adapter and gate parameters train (the backbone and the head stay frozen)."""
        names = set(self.peft_model.peft_config)
        wrong = [
            n
            for n, p in self.peft_model.named_parameters()
            if p.requires_grad and not any(f".{a}." in n or n.endswith(f".{a}") for a in names)
        ]
        if wrong:
            raise AssertionError(f"backbone parameters would train (only adapter and gate may): {wrong[:5]}")
        if self.gate is not None and not isinstance(self.gate, (LowRankGate, FixedGate)):
            raise AssertionError(f"unknown gate module {type(self.gate).__name__}")
