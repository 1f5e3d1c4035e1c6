"""Gate variants that interweave the frozen stream (M) and the tuned stream (M').

Every variant maps per-token hidden states of both streams, plus their query means, to a gate ``g`` in [0, 1] with
the mixed state ``h = g * h_M + (1 - g) * h_M'``. They share one call signature so the model and the tests treat
them alike:

- ``query_aware`` (the paper): ``g = sigmoid(cat[q_M, h_M, h_M', q_M'] @ W_A @ W_B)``, W_A: 4d x r, W_B: r x d.
- ``no_query`` ("w/o query" ablation): ``g = sigmoid(cat[h_M, h_M'] @ W_A @ W_B)``, W_A: 2d x r.
- ``fixed`` ("w/o gate" ablation): ``g = value`` (0.5 in the paper), no parameters.
- ``none``: plain PEFT; the model skips the frozen stream entirely, so no gate module exists.

Each ``conf/gate/<type>.yaml`` names its builder under ``module._target_`` with only that gate's own arguments
(``module: null`` for ``none``); ``gate_from_config`` instantiates it with the backbone's hidden size.

Dropout follows the authors' code: after W_A and after W_B, before the sigmoid. Both linears keep PyTorch's
default (Kaiming-uniform) initialisation, as there. The gate runs in fp32 (as the authors' ``.float()``): a
sigmoid over a bf16 rank-8 projection is coarse, and the gate is tiny.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from hydra.utils import instantiate
from torch import nn

GATE_TYPES = ("query_aware", "no_query", "fixed", "none")


class Gate(Protocol):
    """What ``IMSMModel`` needs from a gate module (every variant below is one)."""

    kind: str  # the ``gate.type`` it implements, written to ``gate.json``
    needs_query: bool  # whether ``forward`` reads the query summaries (the model then computes them)

    def __call__(
        self,
        base_hidden: torch.Tensor,
        tuned_hidden: torch.Tensor,
        base_query: torch.Tensor | None = None,
        tuned_query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """g, the frozen stream's weight, fp32, shaped like ``base_hidden``: (..., d)."""
        ...


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
        # the gate's own precision (fp32) even under autocast (eval.autocast, trainer bf16), which would run its
        # matmuls in bf16 and move g by up to ~1e-2 on the same inputs
        with torch.autocast(base_hidden.device.type, enabled=False):
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


def query_aware_gate(hidden_size: int, rank: int = 8, dropout: float = 0.1) -> LowRankGate:
    """The paper's gate, ``gate.type=query_aware``: W_A 4d x r over ``cat[q_M, h_M, h_M', q_M']``."""
    return LowRankGate(hidden_size, rank, use_query=True, dropout=dropout)


def no_query_gate(hidden_size: int, rank: int = 8, dropout: float = 0.1) -> LowRankGate:
    """The "w/o query" ablation, ``gate.type=no_query``: W_A 2d x r over ``cat[h_M, h_M']``."""
    return LowRankGate(hidden_size, rank, use_query=False, dropout=dropout)


def fixed_gate(hidden_size: int, value: float = 0.5) -> FixedGate:
    """The "w/o gate" ablation, ``gate.type=fixed``; ``hidden_size`` is unused (every builder takes it)."""
    del hidden_size
    return FixedGate(value)


# gate.type -> builder(hidden_size, **that gate's own arguments); ``none`` has no module.
GATE_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "query_aware": query_aware_gate,
    "no_query": no_query_gate,
    "fixed": fixed_gate,
}
GATE_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "query_aware": ("rank", "dropout"),
    "no_query": ("rank", "dropout"),
    "fixed": ("value",),
}


def build_gate(
    gate_type: str, hidden_size: int, rank: int = 8, dropout: float = 0.1, value: float = 0.5
) -> nn.Module | None:
    """Gate module for ``gate.type`` (``None`` for plain PEFT); each builder gets only the arguments it takes.

    Used by tests and to rebuild a saved run's gate from ``gate.json``; runs build theirs from the config
    (``gate_from_config``).
    """
    if gate_type == "none":
        return None
    if gate_type not in GATE_BUILDERS:
        raise ValueError(f"gate.type={gate_type!r} is not one of {list(GATE_TYPES)}")
    given = {"rank": rank, "dropout": dropout, "value": value}
    return GATE_BUILDERS[gate_type](hidden_size, **{k: given[k] for k in GATE_ARGUMENTS[gate_type]})


def gate_from_config(gate_cfg: Mapping[str, Any], hidden_size: int) -> nn.Module | None:
    """The gate a ``conf/gate/*.yaml`` node describes: ``instantiate(gate.module, hidden_size=d)``, None without one.

    A node without a ``module`` key (a config saved before gates named their ``_target_``) is built from its flat
    keys through ``build_gate``.

    Args:
        gate_cfg: the run's ``gate`` node (``type``, ``module``, ...).
        hidden_size: d, the backbone's hidden size.
    """
    gate_type = gate_cfg.get("type")
    if "module" not in gate_cfg:
        defaults = {"rank": 8, "dropout": 0.1, "value": 0.5}
        return build_gate(gate_type, hidden_size, **{k: gate_cfg.get(k, v) for k, v in defaults.items()})
    if gate_cfg["module"] is None:
        if gate_type != "none":
            raise ValueError(
                f"gate.type={gate_type!r} has no gate.module to build (conf/gate/{gate_type}.yaml); only "
                "gate=none runs without one. Give the gate a module with its _target_."
            )
        return None
    gate = instantiate(gate_cfg["module"], hidden_size=hidden_size)
    if getattr(gate, "kind", None) != gate_type:
        raise ValueError(
            f"gate.module._target_={gate_cfg['module'].get('_target_')!r} builds a {getattr(gate, 'kind', None)!r} "
            f"gate but gate.type={gate_type!r}; gate.json records the type, so they must agree"
        )
    return gate
