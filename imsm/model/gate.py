"""Gate variants that interweave the frozen stream (M) and the tuned stream (M').

Every variant maps per-token hidden states of both streams, plus their query means, to a gate ``g`` in [0, 1] with
the mixed state ``h = g * h_M + (1 - g) * h_M'``. They share one call signature so the model and the tests treat
them alike:

- ``query_aware`` (the paper): ``g = sigmoid(cat[q_M, h_M, h_M', q_M'] @ W_A @ W_B)``, W_A: 4d x r, W_B: r x d.
- ``no_query`` ("w/o query" ablation): ``g = sigmoid(cat[h_M, h_M'] @ W_A @ W_B)``, W_A: 2d x r.
- ``fixed`` ("w/o gate" ablation): ``g = value`` (0.5 in the paper), no parameters.
- ``none``: plain PEFT; the model skips the frozen stream entirely, so no gate module exists.

Dropout follows the authors' code: after W_A and after W_B, before the sigmoid. Both linears keep PyTorch's
default (Kaiming-uniform) initialisation, as there. The gate runs in fp32 (as the authors' ``.float()``): a
sigmoid over a bf16 rank-8 projection is coarse, and the gate is tiny.
"""

from __future__ import annotations

import torch
from torch import nn

GATE_TYPES = ("query_aware", "no_query", "fixed", "none")


class LowRankGate(nn.Module):
    """``sigmoid(dropout(dropout(x @ W_A) @ W_B))`` over the concatenated features; no bias.

    Args:
        hidden_size: d, the backbone's hidden size.
        rank: r, the bottleneck rank.
        use_query: True -> input is ``cat[q_M, h_M, h_M', q_M']`` (4d); False -> ``cat[h_M, h_M']`` (2d).
        dropout: dropout probability after each linear.
    """

    def __init__(self, hidden_size: int, rank: int = 8, use_query: bool = True, dropout: float = 0.1):
        super().__init__()
        self.hidden_size = hidden_size
        self.rank = rank
        self.use_query = use_query
        self.kind = "query_aware" if use_query else "no_query"
        self.down = nn.Linear((4 if use_query else 2) * hidden_size, rank, bias=False)  # W_A
        self.up = nn.Linear(rank, hidden_size, bias=False)  # W_B
        self.dropout = nn.Dropout(dropout)

    @property
    def needs_query(self) -> bool:
        return self.use_query

    def forward(
        self,
        base_hidden: torch.Tensor,
        tuned_hidden: torch.Tensor,
        base_query: torch.Tensor | None = None,
        tuned_query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Gate values.

        Args:
            base_hidden, tuned_hidden: (..., d) last-layer states of M and M', e.g. (batch, seq, d), or
                (n, d) for n selected positions.
            base_query, tuned_query: query summaries of M and M' (used when ``use_query``): either the same
                shape as the hidden states (already gathered per position) or (batch, d), broadcast over seq.

        Returns:
            g: same shape as ``base_hidden``, fp32, weight of the frozen stream.
        """
        parts = [base_hidden, tuned_hidden]
        if self.use_query:
            if base_query is None or tuned_query is None:
                raise ValueError("the query-aware gate needs the query means of both streams")
            bq, tq = base_query, tuned_query
            if bq.dim() < base_hidden.dim():
                bq = bq.unsqueeze(-2).expand_as(base_hidden)
                tq = tq.unsqueeze(-2).expand_as(tuned_hidden)
            parts = [bq, base_hidden, tuned_hidden, tq]  # the paper's order: [q_M, h_M, h_M', q_M']
        x = torch.cat(parts, dim=-1).to(self.down.weight.dtype)
        return torch.sigmoid(self.dropout(self.up(self.dropout(self.down(x)))))


class FixedGate(nn.Module):
    """Constant gate (the "w/o gate" ablation): ``g = value`` everywhere, no parameters."""

    def __init__(self, value: float = 0.5):
        super().__init__()
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"gate.value={value} must be in [0, 1]")
        self.value = value
        self.kind = "fixed"

    needs_query = False

    def forward(
        self, base_hidden: torch.Tensor, tuned_hidden: torch.Tensor, *_: torch.Tensor | None
    ) -> torch.Tensor:
        return torch.full_like(base_hidden, self.value, dtype=torch.float32)


def build_gate(
    gate_type: str, hidden_size: int, rank: int = 8, dropout: float = 0.1, value: float = 0.5
) -> nn.Module | None:
    """Gate module for ``gate.type`` (``None`` for plain PEFT)."""
    if gate_type == "query_aware":
        return LowRankGate(hidden_size, rank, use_query=True, dropout=dropout)
    if gate_type == "no_query":
        return LowRankGate(hidden_size, rank, use_query=False, dropout=dropout)
    if gate_type == "fixed":
        return FixedGate(value)
    if gate_type == "none":
        return None
    raise ValueError(f"gate.type={gate_type!r} is not one of {list(GATE_TYPES)}")
