"""What IMSM requires of an adapter, checked when it is attached, before any training.

A researcher can put anything peft accepts into ``peft.config``. IMSM is exact only if:

1. **The frozen stream is the pretrained model.** It is the same backbone run inside ``disable_adapter()``, so no
   parameter that ``disable_adapter()`` leaves on may train (peft's ``bias="all"`` / ``"lora_only"`` train the base
   layers' biases), and attaching the adapter must not rewrite the base weights (PiSSA, OLoRA, CorDA, LoftQ and
   LoRA-GA initialisations replace W by a residual W - BA, so "adapter off" would be the residual).
2. **The head that reads the mix is the frozen, shared head.** ``logits = lm_head(g h_M + (1 - g) h_M')``: an adapter
   on ``lm_head`` (LoRA ``target_modules``, ``modules_to_save``, or ``trainable_token_indices`` on tied embeddings,
   which peft mirrors onto the head) would train the head and change the frozen model's logits.
3. **Stream fusion is exact** (``imsm.model.fusion.can_fuse_streams``): only the linear layers of LoRA (plain or
   DoRA), AdaLoRA, IA3, LoHa and LoRAMoE can run the two streams as halves of one batch
   (``imsm.model.fused_layers``); any other adapted module (a LoRA embedding, a ``modules_to_save`` copy, trainable
   tokens, another LoRA variant or peft method) makes the model fall back to two passes instead of being wrong.

``imsm.model.build.wrap_backbone`` takes ``fingerprints`` of the backbone, attaches the adapter, then calls
``check_adapter`` for (1) and (2), which raises ``ValueError`` naming the option and why; (3) is decided per model
when decoding. ``tests/test_peft_guard.py`` runs a matrix of peft's options against these invariants; the
README's methods section lists what runs and what is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

FINGERPRINT_SAMPLES = (
    4096  # elements read per base parameter: a rewrite by a low-rank residual changes them all
)
REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def fingerprints(model: nn.Module) -> dict[int, tuple[nn.Parameter, torch.Tensor]]:
    """``{id(p): (p, a strided sample of p's values)}`` of every materialised parameter of ``model``.

    A sample, not a copy: a 7B backbone would otherwise need its weights twice. Parameters with no storage here
    (the meta device of a dry run, ZeRO-3 partitions) are skipped.
    """
    return {id(p): (p, _sample(p).clone()) for p in model.parameters() if _materialised(p)}


def _materialised(p: torch.Tensor) -> bool:
    return p.device.type != "meta" and p.numel() > 0


def _sample(p: torch.Tensor) -> torch.Tensor:
    """About ``FINGERPRINT_SAMPLES`` evenly strided values of ``p``."""
    flat = p.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // FINGERPRINT_SAMPLES)]


def backbone_parameters_that_train(model: nn.Module, adapters: set[str]) -> list[str]:
    """Names of ``model``'s trainable parameters that belong to no adapter (peft keys each adapter's parameters by
    its name: ``lora_A.default.weight``, ``modules_to_save.default.weight``)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not _is_adapter_param(n, adapters)]


def check_adapter(
    peft_model: Any,
    config: Any,
    before: dict[int, tuple[nn.Parameter, torch.Tensor]],
    head_of: Callable[[], nn.Module],
) -> None:
    """Raise ``ValueError`` naming the peft option when the adapter breaks invariant (1) or (2) above."""
    adapters = set(getattr(peft_model, "peft_config", {}) or {})
    base = peft_model.get_base_model()
    _check_head(base, config, head_of)
    _check_base_frozen(base, config, adapters)
    _check_base_unchanged(base, config, adapters, before)


def _is_adapter_param(name: str, adapters: set[str]) -> bool:
    parts = name.split(".")
    return any(a in parts for a in adapters)


def _option(config: Any, *fields: str) -> str:
    """``field=value`` of the first of ``fields`` the config sets (for messages)."""
    for field in fields:
        value = getattr(config, field, None)
        if value not in (None, False, "none", [], {}):
            return f"peft.config.{field}={value!r}"
    return "this peft config"


def _option_naming(config: Any, text: str, fields: tuple[str, ...]) -> str:
    """``field=value`` of the first of ``fields`` whose value mentions ``text``."""
    for field in fields:
        value = getattr(config, field, None)
        if value is not None and text in str(value):
            return f"peft.config.{field}={value!r}"
    return "this peft config"


def _check_head(base: nn.Module, config: Any, head_of: Callable[[], nn.Module]) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    head = head_of()
    wrapped = [m for m in head.modules() if isinstance(m, BaseTunerLayer | AuxiliaryTrainingWrapper)]
    trains = [n for n, p in head.named_parameters() if p.requires_grad]
    if wrapped or trains:
        option = _option_naming(config, "lm_head", ("target_modules", "modules_to_save"))
        if option == "this peft config":
            option = _option(config, "trainable_token_indices")
        raise ValueError(
            f"{option} adapts the output head ({type(wrapped[0]).__name__ if wrapped else trains[0]}). IMSM reads "
            "both streams through the frozen, shared head (logits = lm_head(g h_M + (1 - g) h_M')): an adapted head "
            "would train and change the frozen model's own logits (streams=base would no longer be the frozen model). "
            "Leave lm_head (and, with tied embeddings, trainable_token_indices) out of the adapter."
        )


def _check_base_frozen(base: nn.Module, config: Any, adapters: set[str]) -> None:
    trains = backbone_parameters_that_train(base, adapters)
    if trains:
        option = _option(config, "bias") if any(n.endswith("bias") for n in trains) else "this peft config"
        raise ValueError(
            f"{option} trains parameters of the backbone itself ({', '.join(trains[:3])}"
            f"{', ...' if len(trains) > 3 else ''}). disable_adapter() does not undo their updates, so the frozen "
            "stream would drift away from the pretrained model. Use bias='none' (IMSM trains the adapter and gate only)."
        )


def _check_base_unchanged(
    base: nn.Module, config: Any, adapters: set[str], before: dict[int, tuple[nn.Parameter, torch.Tensor]]
) -> None:
    if not before:  # a meta-device (dry-run) build: nothing to compare
        return
    changed = []
    for name, p in base.named_parameters():
        if _is_adapter_param(name, adapters) or not _materialised(p):
            continue
        entry = before.get(
            id(p)
        )  # None: a new tensor where a base weight was (the module's weight was replaced)
        if entry is None or not torch.equal(_sample(p), entry[1]):
            changed.append(name)
    if changed:
        init = getattr(config, "init_lora_weights", None)
        option = (
            f"peft.config.init_lora_weights={init!r}"
            if isinstance(init, str) and init.lower().startswith(REWRITING_INITS)
            else "this peft config"
        )
        raise ValueError(
            f"{option} rewrote backbone weights when the adapter was attached ({', '.join(changed[:3])}"
            f"{', ...' if len(changed) > 3 else ''}): initialisations such as PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA "
            "replace W by a residual W - BA, so the frozen stream (the adapter switched off) would not be the "
            "pretrained model. Use init_lora_weights=true (default), false or 'gaussian'."
        )
