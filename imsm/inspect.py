"""Look at one example through a trained run's gate: the frozen stream's weight g per token, as a picture.

``python -m imsm.inspect run_dir=... 'text="..."' ['answer="..."'] [out=gate.png] [max_new_tokens=32]`` (or
``imsm-inspect ...``) loads a saved run, encodes the prompt exactly as training does (``imsm.data.collate``), appends
an answer (the given one teacher-forced, tokenised as training appends a target, EOS included; otherwise the model's
own greedy answer up to and including its EOS), runs both streams once over the whole sequence
(``IMSMModel.streams``) and reads the gate there (``IMSMModel.gate_values``: the mean of g over the d features).

Convention: the bar of position t is labelled with position t's own token, but its g mixes the hidden state that
*predicts token t+1*. So the last prompt token's bar is the gate that chose the first answer token.

Writes a PNG (one bar per token, prompt and answer in two colours, a line at 0.5) and a JSON beside it (run dir,
text, answer, and ``tokens: [{"position", "token", "part", "gate"}]`` for every token), and prints a table.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from imsm import CONF_DIR
from imsm.data.base import Example
from imsm.data.collate import Truncation, encode_example, fit_prompt, left_pad
from imsm.io import write_json
from imsm.model.checkpoint import GATE_CONFIG, RUN_CONFIG
from imsm.model.siamese import IMSMModel

log = logging.getLogger(__name__)

CONVENTION = (
    "bar t: the gate g at position t, labelled with token t; g there mixes the state that predicts token t+1"
)
PROMPT_COLOUR = "tab:blue"
ANSWER_COLOUR = "tab:orange"
DEFAULT_PNG = "gate_per_token.png"  # not gate.png: its JSON would be named like the run's gate.json


class NoGateError(ValueError):
    """The run has no gate (``gate=none``: vanilla PEFT), so there is nothing to inspect."""


@dataclass
class TokenGates:
    """One example's tokens and the gate value at each position.

    Attributes:
        ids: prompt ids followed by answer ids, (seq,) as a list.
        tokens: each id decoded on its own (what the picture labels the bars with).
        n_prompt: how many of ``ids`` are prompt (query) tokens.
        gates: g at each position, mean over the d features, in [0, 1].
        answer_source: ``given`` (teacher-forced) or ``generated`` (the model's greedy answer).
        prompt_truncated: the prompt was longer than ``max_input_length`` and kept its last tokens.
    """

    ids: list[int]
    tokens: list[str]
    n_prompt: int
    gates: list[float]
    answer_source: str
    prompt_truncated: bool = False

    def rows(self) -> list[dict[str, Any]]:
        """``[{"position", "token", "part", "gate"}]``, one per token."""
        return [
            {"position": i, "token": tok, "part": "prompt" if i < self.n_prompt else "answer", "gate": g}
            for i, (tok, g) in enumerate(zip(self.tokens, self.gates, strict=True))
        ]


def refuse_without_gate(run_dir: str | Path) -> None:
    """Raise ``NoGateError`` before loading anything when ``gate.json`` says the run has no gate."""
    meta_path = Path(run_dir) / GATE_CONFIG
    if meta_path.exists():
        gate_type = json.loads(meta_path.read_text()).get("type")
        if gate_type == "none":
            raise NoGateError(no_gate_message(run_dir, f"{meta_path} says type 'none'"))


def no_gate_message(run_dir: str | Path, why: str) -> str:
    return (
        f"{run_dir} has no gate to inspect ({why}): it is a vanilla PEFT run (gate=none), where only the tuned "
        "stream runs. Inspect a run trained with gate=query_aware, no_query or fixed."
    )


def greedy_answer(
    model: IMSMModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], max_new_tokens: int
) -> list[int]:
    """The model's greedy answer to one prompt (the IMSM streams), up to and including its first EOS."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad([prompt_ids], pad)
    new = model.generate(
        input_ids.to(device), attention_mask.to(device), max_new_tokens, eos_token_id=eos, pad_token_id=pad
    )[0].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


@torch.no_grad()
def token_gates(
    model: IMSMModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    answer: str | None = None,
    *,
    max_input_length: int = 512,
    max_output_length: int = 512,
    chat_template: bool = False,
    max_new_tokens: int = 32,
) -> TokenGates:
    """Encode ``text`` (+ ``answer``, or the model's greedy answer) and read the gate at every position.

    The whole sequence goes through both streams once, with ``query_mask`` 1 on the prompt tokens, as in training.

    Raises:
        NoGateError: the model has no gate.
    """
    if model.gate is None:
        raise NoGateError(no_gate_message("this model", "IMSMModel.gate is None"))
    stats = Truncation()
    if answer is None:
        prompt_ids = fit_prompt(tokenizer, text, max_input_length, chat_template, stats)
        answer_ids = greedy_answer(model, tokenizer, prompt_ids, max_new_tokens)
    else:
        features = encode_example(
            tokenizer, Example(text, answer), max_input_length, max_output_length, chat_template, stats
        )
        n = features["query_len"][0]
        prompt_ids, answer_ids = features["input_ids"][:n], features["input_ids"][n:]
    stats.total = 1
    stats.report("imsm.inspect")
    ids = prompt_ids + answer_ids
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    attention_mask = torch.ones_like(input_ids)
    query_mask = torch.zeros_like(input_ids)
    query_mask[:, : len(prompt_ids)] = 1
    base, tuned, bq, tq = model.streams(input_ids, attention_mask, query_mask)
    gates = model.gate_values(base, tuned, bq, tq)[0].tolist()  # (seq,)
    return TokenGates(
        ids=ids,
        tokens=[tokenizer.decode([i]) for i in ids],
        n_prompt=len(prompt_ids),
        gates=gates,
        answer_source="generated" if answer is None else "given",
        prompt_truncated=stats.prompts > 0,
    )


def first_shown(result: TokenGates, max_prompt_tokens: int) -> int:
    """The first position the picture shows: all answer tokens and at most the last ``max_prompt_tokens`` of the
    prompt, so this is also how many prompt tokens are left out."""
    return max(0, result.n_prompt - max_prompt_tokens)


def tick_label(token: str) -> str:
    """A token made visible on an axis: newlines and tabs escaped, spaces shown as '·', '$' not read as TeX."""
    label = token.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·").replace("$", r"\$")
    return label or "∅"


def plot(result: TokenGates, path: Path, title: str, max_prompt_tokens: int = 120) -> None:
    """Bar chart of g per token (prompt and answer in two colours, 0.5 marked), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from imsm.report.plots import write_figure

    start = hidden = first_shown(result, max_prompt_tokens)
    rows = result.rows()[start:]
    xs = list(range(len(rows)))
    colours = [PROMPT_COLOUR if r["part"] == "prompt" else ANSWER_COLOUR for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 1.5), 4.2))
    try:
        ax.bar(xs, [r["gate"] for r in rows], color=colours, width=0.8)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_xticks(xs)
        ax.set_xticklabels([tick_label(r["token"]) for r in rows], rotation=90, fontsize=7)
        ax.set_ylabel("g (frozen stream's weight, mean over d)")
        answer_label = "answer (teacher-forced)" if result.answer_source == "given" else "answer (greedy)"
        ax.legend(
            handles=[
                Patch(color=PROMPT_COLOUR, label="prompt"),
                Patch(color=ANSWER_COLOUR, label=answer_label),
            ],
            loc="upper right",
            fontsize=8,
        )
        note = f"first {hidden} prompt tokens not shown (see the JSON); " if hidden else ""
        ax.set_title(f"{title}\n{note}{CONVENTION}", fontsize=8)
        write_figure(fig, path)
    finally:
        plt.close(fig)


def text_table(result: TokenGates, max_prompt_tokens: int = 120) -> str:
    """``position  part  gate  token`` per shown token, for the terminal."""
    start = hidden = first_shown(result, max_prompt_tokens)
    lines = [f"{'pos':>5}  {'part':<6}  {'gate':>6}  token"]
    if hidden:
        lines.append(f"  ...  ({hidden} earlier prompt tokens in the JSON)")
    for r in result.rows()[start:]:
        lines.append(f"{r['position']:>5}  {r['part']:<6}  {r['gate']:6.3f}  {r['token']!r}")
    return "\n".join(lines)


def run_setting(cfg: DictConfig, run_cfg: DictConfig, key: str, default: Any) -> Any:
    """``cfg.key`` when set, else the run's own ``key`` (its config.yaml), else ``default``."""
    value = cfg.get(key)
    return value if value is not None else run_cfg.get(key, default)


def inspect_run(cfg: DictConfig) -> dict[str, Any]:
    """Load ``cfg.run_dir``, compute the gate per token for ``cfg.text`` (+ answer), write the PNG and JSON.

    Returns:
        ``{"png", "json", "result"}``: the two paths and the ``TokenGates``.

    Raises:
        NoGateError: the run was trained with ``gate=none``.
    """
    run_dir = Path(cfg.run_dir)
    refuse_without_gate(run_dir)
    model, tokenizer = IMSMModel.from_pretrained(
        run_dir, device=cfg.get("device"), trust_remote_code=bool(cfg.get("trust_remote_code"))
    )
    if model.gate is None:
        raise NoGateError(no_gate_message(run_dir, "its loaded model has no gate module"))
    run_cfg = OmegaConf.load(run_dir / RUN_CONFIG)
    answer = None if cfg.get("answer") is None else str(cfg.answer)
    result = token_gates(
        model,
        tokenizer,
        str(cfg.text),
        answer,
        max_input_length=int(run_setting(cfg, run_cfg, "max_input_length", 512)),
        max_output_length=int(run_setting(cfg, run_cfg, "max_output_length", 512)),
        chat_template=bool(run_setting(cfg, run_cfg, "chat_template", False)),
        max_new_tokens=int(cfg.max_new_tokens),
    )
    png = Path(cfg.out) if cfg.get("out") else Path(HydraConfig.get().runtime.output_dir) / DEFAULT_PNG
    json_path = png.with_suffix(".json")
    if json_path.resolve() == (run_dir / GATE_CONFIG).resolve():
        raise ValueError(
            f"out={cfg.out!r} would write its JSON over the run's own {json_path}; choose another name, "
            f"e.g. out={run_dir / DEFAULT_PNG}"
        )
    max_prompt = int(cfg.get("max_prompt_tokens") or 120)
    gate_type = json.loads((run_dir / GATE_CONFIG).read_text()).get("type")
    plot(result, png, f"IMSM gate per token ({gate_type}): {run_dir}", max_prompt)
    write_json(
        json_path,
        {
            "run_dir": str(run_dir),
            "text": str(cfg.text),
            "answer": tokenizer.decode(result.ids[result.n_prompt :]),
            "answer_source": result.answer_source,
            "prompt_truncated": result.prompt_truncated,
            "convention": CONVENTION,
            "tokens": result.rows(),
        },
    )
    return {"png": png, "json": json_path, "result": result}


@hydra.main(config_path=str(CONF_DIR), config_name="inspect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("imsm").setLevel(logging.INFO)
    out = inspect_run(cfg)
    max_prompt = int(cfg.get("max_prompt_tokens") or 120)
    print(
        f"\n{text_table(out['result'], max_prompt)}\n({CONVENTION})\npicture: {out['png']}\njson: {out['json']}"
    )


if __name__ == "__main__":
    main()
