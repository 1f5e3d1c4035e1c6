"""LoRAMoE (Dou et al. 2023): a mixture of LoRA experts in each feed-forward linear, with a localized balancing loss.

A baseline of the paper's Figure 3, rebuilt from the official code (github.com/Ablustrund/LoRAMoE, a fork of
peft 0.3 / transformers 4.30 that no longer runs), for peft has no such method:

- each targeted linear (``gate_proj``, ``up_proj``, ``down_proj``) gets its own router ``Linear(in, E, bias=False)``
  and E LoRA experts ``B_i A_i`` (rank r, no bias; B zero, A and the router Kaiming-uniform with a = sqrt(5));
- ``y = W x + alpha / r * sum_i w_i(x) B_i A_i drop_i(x)``, ``w = softmax(router(x))`` dense over the experts, in
  fp32, no top-k; ``drop_i``: the official loop draws a fresh dropout mask for each expert, so does this one;
- the localized balancing constraint (LBC) of one routed linear over a micro-batch: ``Q[m, n]`` = router weight of
  expert n summed over the tokens of sample m; ``I[m, n] = 1 + delta`` where (sample m is world knowledge,
  ``task_type`` 1, and n < E/2) or (``task_type`` 0 and n >= E/2), else ``1 - delta``; the term is
  ``beta * var(Z) / (mean(Z)^2 + 1e-10)``, ``Z = (I * Q)`` flattened, unbiased variance; summed over every routed
  linear and added to the language-model loss.

One deliberate difference: padding tokens do not count in ``Q`` (the official code sums every position, but trained
with one sample per device, so it never had padding; masking keeps a padded batch equal to that).

Plain module injection: each targeted ``nn.Linear`` is replaced by a ``LoRAMoELinear`` that holds it as
``base_layer`` and its experts under ``loramoe`` (parameter names contain ``.loramoe.``, the adapter's name).
``LoRAMoEModel`` wraps the backbone with the part of ``peft.PeftModel``'s surface that ``IMSMModel`` uses
(``get_base_model``, ``disable_adapter``, ``peft_config`` / ``active_adapter``, ``save_pretrained``,
``from_pretrained``), so the siamese model needs no special case: its frozen stream switches the experts off.

Routing weights reach the loss through the layers: each ``LoRAMoELinear`` keeps the router weights of its last
forward with the experts on (``last_routing``), and ``LoRAMoEModel.balance_loss`` reads them right after the
forward. The frozen stream runs with the experts off and records nothing. Under gradient checkpointing only the
non-reentrant kind keeps those weights in the graph; the reentrant kind runs the forward without gradients, so the
LBC would silently stop training the routers: ``balance_loss`` raises instead.

Laid out like a peft tuner: ``config`` (``LoRAMoEConfig``), ``layer`` (``LoRAMoEExperts``, ``LoRAMoELinear``),
``model`` (``LoRAMoEModel``, injection, the balancing loss, save / load).
"""

from imsm.model.loramoe.config import (
    ADAPTER_NAME,
    CONFIG_NAME,
    CV_EPS,
    FEEDFORWARD,
    WEIGHTS_NAME,
    LoRAMoEConfig,
    LoRAMoEType,
)
from imsm.model.loramoe.layer import LoRAMoEExperts, LoRAMoELinear
from imsm.model.loramoe.model import (
    LoRAMoEModel,
    cv_squared,
    inject_loramoe,
    is_loramoe_adapter,
    localized_balance,
    loramoe_model,
    routing_importance,
)

__all__ = [
    "ADAPTER_NAME",
    "CONFIG_NAME",
    "CV_EPS",
    "FEEDFORWARD",
    "WEIGHTS_NAME",
    "LoRAMoEConfig",
    "LoRAMoEExperts",
    "LoRAMoELinear",
    "LoRAMoEModel",
    "LoRAMoEType",
    "cv_squared",
    "inject_loramoe",
    "is_loramoe_adapter",
    "localized_balance",
    "loramoe_model",
    "routing_importance",
]
