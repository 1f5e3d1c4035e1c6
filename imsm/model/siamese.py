"""The siamese model: one backbone, two streams, a gate, the shared frozen head.

``IMSMModel`` wraps a ``peft.PeftModel`` (the backbone with an injected adapter) and a gate. The frozen stream M is
the *same* module run inside ``peft_model.disable_adapter()`` without gradients; the tuned stream M' runs with the
adapter. Both return the decoder's last hidden state (after the final norm); full-vocabulary logits are only ever
computed once, on the mixed state, and in training only at the response positions that carry a label.

Training (``forward``): ``h = g * h_M + (1 - g) * h_M'``, ``logits = lm_head(h)``, cross-entropy on the response;
with ``trainer.cache_frozen`` the epochs after the first read h_M and q_M back (``imsm.model.frozen_cache``).
Generation (``generate``): both streams keep their own KV cache; the query means are computed once at prefill. The
decoding loop lives in ``imsm.model.decoding``, the doubled-batch stream fusion in ``imsm.model.fusion``, the run
directory format in ``imsm.model.checkpoint``; this module keeps the model itself.
``gate=None`` is plain PEFT through the same code (only the tuned stream runs), so comparisons are fair.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.utils import ModelOutput

from imsm.constants import IGNORE_INDEX
from imsm.model.adapters import AdapterModel
from imsm.model.families import Family, family_of
from imsm.model.fusion import adapter_on_second_half, can_fuse_streams
from imsm.model.gate import FixedGate, LowRankGate
from imsm.model.guard import backbone_parameters_that_train

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from transformers import PreTrainedTokenizerBase

    from imsm.model.frozen_cache import FrozenCache

__all__ = ["IGNORE_INDEX", "STREAMS", "IMSMModel", "IMSMOutput", "pool_query", "positions_from_mask"]

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
        peft_model: the backbone with its adapter injected (``peft.get_peft_model`` / ``PeftModel.from_pretrained``,
            or LoRAMoE): anything offering ``imsm.model.adapters.AdapterModel``.
        gate: a gate module (``imsm.model.gate``) or None for plain PEFT.
        pooling: query summary, ``mean`` (paper) or ``max``.
    """

    def __init__(self, peft_model: AdapterModel, gate: nn.Module | None, pooling: str = "mean"):
        super().__init__()
        self.peft_model = peft_model
        self.gate = gate
        self.pooling = pooling
        self.config = peft_model.get_base_model().config  # HF Trainer and accelerate look for it
        # trainer.cache_frozen: the frozen stream's states per training example (imsm.model.frozen_cache)
        self.frozen_cache: FrozenCache | None = None

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

    def streams(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_mask: torch.Tensor | None = None,
        frozen: bool | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Both streams' last hidden states and query summaries: ``(h_M, h_M', q_M, q_M')``.

        Args:
            input_ids, attention_mask: (batch, seq).
            query_mask: (batch, seq), 1 on prompt tokens (needed by the query-aware gate, and for the summaries).
            frozen: also run the frozen stream M; None: only when the gate needs it (vanilla PEFT: no).

        Returns:
            h_M (batch, seq, d) or None, h_M' (batch, seq, d), q_M and q_M' (batch, d) or None.
        """
        tuned = self.stream_hidden(input_ids, attention_mask, adapter=True)
        if not (self.gate is not None if frozen is None else frozen):
            return None, tuned, None, None
        base = self.stream_hidden(input_ids, attention_mask, adapter=False)
        needs_query = getattr(self.gate, "needs_query", False)
        if query_mask is None:
            if needs_query:
                raise ValueError("the query-aware gate needs `query_mask` (1 on prompt tokens) in the batch")
            return base, tuned, None, None
        if self.gate is not None and not needs_query:
            return base, tuned, None, None
        return (
            base,
            tuned,
            pool_query(base, query_mask, self.pooling),
            pool_query(tuned, query_mask, self.pooling),
        )

    def gate_values(
        self,
        base_hidden: torch.Tensor,
        tuned_hidden: torch.Tensor,
        base_query: torch.Tensor | None = None,
        tuned_query: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """The frozen stream's weight per position, averaged over the d features: (...,) fp32; None without gate."""
        if self.gate is None:
            return None
        return self.gate(base_hidden, tuned_hidden, base_query, tuned_query).float().mean(-1)

    def mixed_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mixed last-layer state at every position, (batch, seq, d)."""
        base, tuned, bq, tq = self.streams(input_ids, attention_mask, query_mask)
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
        index: torch.Tensor | None = None,
    ) -> IMSMOutput:
        """Loss on response tokens (and optionally logits at every position).

        Args:
            input_ids, attention_mask: (batch, seq).
            query_mask: (batch, seq), 1 on prompt tokens.
            labels: (batch, seq), ``-100`` on prompt and padding; position t is predicted from t-1.
            return_logits: also return (batch, seq, vocab) logits (tests and debugging; costly).
            task_type: (batch,) per-row task type from the collator; unused here: ``IMSMTrainer.compute_loss``
                reads it from the batch for LoRAMoE's balancing loss, which needs the routing of this forward.
            index: (batch,) each row's index in the training set (``IndexedDataset``): with a ``frozen_cache``,
                a training step reads the frozen stream's states from it instead of running the frozen stream.
        """
        cached = (
            self.frozen_cache is not None
            and index is not None
            and labels is not None
            and not return_logits
            and self.training
            and self.gate is not None
        )
        if cached:  # the tuned stream only; the frozen states come from the cache at the labelled positions
            needs_query = getattr(self.gate, "needs_query", False)
            if needs_query and query_mask is None:
                raise ValueError("the query-aware gate needs `query_mask` (1 on prompt tokens) in the batch")
            query_mask = query_mask if needs_query else None
            base = bq = None
            tuned = self.stream_hidden(input_ids, attention_mask, adapter=True)
            tq = None if query_mask is None else pool_query(tuned, query_mask, self.pooling)
        else:
            base, tuned, bq, tq = self.streams(input_ids, attention_mask, query_mask)
        logits = self.lm_head(self.mix(base, tuned, bq, tq)) if return_logits else None
        loss = None
        if labels is not None:
            # Only positions whose next token is a response label need the head: a few % of the full logits.
            target = labels[:, 1:]
            rows, cols = (target != IGNORE_INDEX).nonzero(as_tuple=True)

            def at_labels(t: torch.Tensor | None, per_row: bool = False) -> torch.Tensor | None:
                # (batch, seq, d) -> (n, d) at the labelled positions; (batch, d) query summaries -> their rows
                return None if t is None else (t[rows] if per_row else t[:, :-1][rows, cols])

            if cached:
                base_at, bq_at = self.frozen_cache.frozen_at_labels(
                    self, index, input_ids, attention_mask, query_mask, rows, cols
                )
            else:
                base_at, bq_at = at_labels(base), at_labels(bq, True)
            mixed = self.mix(base_at, at_labels(tuned), bq_at, at_labels(tq, True))
            token_logits = self.lm_head(mixed).float()
            loss = F.cross_entropy(token_logits, target[rows, cols], reduction="mean")
        return IMSMOutput(loss=loss, logits=logits)

    # --- generation ---------------------------------------------------------------------------------------
    def can_fuse_streams(self) -> bool:
        """True when both streams can run as one doubled batch (``imsm.model.fusion.can_fuse_streams``)."""
        return can_fuse_streams(self.peft_model, self.family)

    def adapter_on_second_half(self, batch: int) -> contextlib.AbstractContextManager[None]:
        """Rows ``[:b]`` frozen, ``[b:]`` with the adapter, inside (``imsm.model.fusion.adapter_on_second_half``)."""
        return adapter_on_second_half(self.peft_model, batch)

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
        static_cache: bool | None = None,
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
            static_cache: decode with a static KV cache and a compiled step, CUDA graphs on CUDA
                (``imsm.model.static_decoding``; the same tokens, with a compilation per new batch size and length
                bucket). None: the eager decoder, unless the environment variable ``IMSM_STATIC_CACHE`` is
                ``cuda`` (on CUDA) or ``1`` (every device): then for plain transformers decoders (not ChatGLM,
                no sliding-window layers), falling back to the eager decoder with a warning if the step fails to
                compile. True: always (on CPU too), raising for a model it cannot decode; False: never.

        Returns:
            (batch, n_new) new token ids, n_new <= max_new_tokens, ``pad_token_id`` after each row's EOS.
        """
        # both import this module: top-level imports would cycle
        from imsm.model import static_decoding
        from imsm.model.decoding import greedy_generate

        args = (self, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
        kwargs = {
            "streams": streams,
            "fuse_streams": fuse_streams,
            "stop_check_every": stop_check_every,
            "prefill_tokens": prefill_tokens,
        }
        if static_decoding.chosen(self, input_ids.device, static_cache):
            try:
                return static_decoding.static_generate(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as error:  # compilation failed (a backend, a trace)
                if static_cache:
                    raise
                static_decoding.give_up(self, error)
        return greedy_generate(*args, **kwargs)

    # --- save / load (the run directory format: ``imsm.model.checkpoint``) -----------------------------------
    def save_pretrained(self, run_dir: str | Path, cfg: DictConfig | None = None) -> None:
        """Write ``adapter/`` (peft format), ``gate.safetensors`` + ``gate.json`` and, given ``cfg``, ``config.yaml``.

        Args:
            run_dir: the run directory (created if needed).
            cfg: the run config, saved resolved; ``from_pretrained`` needs it to rebuild the backbone.
        """
        from imsm.model.checkpoint import save_run  # imports this module: a top-level import would cycle

        save_run(self, run_dir, cfg)

    @classmethod
    def from_pretrained(
        cls, run_dir: str | Path, device: str | None = None, trust_remote_code: bool = False
    ) -> tuple[IMSMModel, PreTrainedTokenizerBase]:
        """Rebuild a saved run (eval mode) and its tokenizer: backbone from ``config.yaml``, adapter, gate weights.

        Args:
            run_dir: a directory written by ``save_pretrained`` with a config.
            device: where to load the backbone; None: the backbone file's default.
            trust_remote_code: allow a run whose config sets ``backbone.trust_remote_code`` (refused otherwise).
        """
        from imsm.model.checkpoint import load_run

        return load_run(run_dir, device=device, trust_remote_code=trust_remote_code)

    # --- bookkeeping --------------------------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, int]:
        """Trainable counts: ``adapter`` (the PEFT method), ``gate``, ``total``."""
        adapter = sum(p.numel() for p in self.peft_model.parameters() if p.requires_grad)
        gate = 0 if self.gate is None else sum(p.numel() for p in self.gate.parameters() if p.requires_grad)
        return {"adapter": adapter, "gate": gate, "total": adapter + gate}

    def check_trainable(self) -> None:
        """Assert that only adapter and gate parameters train (the backbone and the head stay frozen)."""
        wrong = backbone_parameters_that_train(self.peft_model, set(self.peft_model.peft_config))
        if wrong:
            raise AssertionError(f"backbone parameters would train (only adapter and gate may): {wrong[:5]}")
        if self.gate is not None and not isinstance(self.gate, (LowRankGate, FixedGate)):
            raise AssertionError(f"unknown gate module {type(self.gate).__name__}")
