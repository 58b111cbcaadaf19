"""Greedy generation from a zoo or a base, with the expert that weighed most on each new token, and that routing
as coloured text."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from rich.text import Text

from ..data import pad_id
from ..errors import ZooError
from ..nn.compat import compiled_generation
from ..zoo import Zoo

COLORS = ("cyan", "magenta", "green", "yellow", "blue", "red")


def generate(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int, chat: bool = False,
             show_routing: bool = False, compile: bool = False) -> tuple[str, list[str] | None]:
    """Greedy continuation of `prompt` (special tokens such as <|im_end|> left out of the text); with
    `show_routing`, the dominant expert of each new token; `compile`: a static cache and compiled decode steps
    (`Zoo.generate(compile=True)`; for a plain base, the same through transformers)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id(tokenizer))
    if compile:
        if show_routing:
            raise ZooError("--show-routing records every step's routing on the host, which a compiled forward "
                           "cannot do; drop --compile or --show-routing")
        if isinstance(model, Zoo):
            kw["compile"] = True
        else:
            kw.update(compiled_generation(model.device))
    if show_routing and isinstance(model, Zoo):
        with torch.no_grad(), model.trace() as trace:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        labels = dominant_experts(trace.records, model.expert_names)
    else:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        labels = None
    new = out[0, ids.shape[1]:]
    pieces = [tokenizer.decode(t, skip_special_tokens=True) for t in new.tolist()]
    return "".join(pieces) if labels is None else pieces, labels


def dominant_experts(records: list[dict], names: list[str]) -> list[str]:
    """Per forward step, the expert with the most routing weight at the last position, over all sites."""
    mass: dict[int, torch.Tensor] = defaultdict(lambda: torch.zeros(len(names) + 1))
    for rec in records:
        idx, w = rec["indices"][-1], rec["weights"][-1]  # last token: [k]
        for i, wi in zip(idx.tolist(), w.tolist()):
            mass[rec["step"]][i if i >= 0 else len(names)] += wi if i != -1 else 0.0
    return [(names + ["base"])[int(m.argmax())] if m.sum() > 0 else "base" for _, m in sorted(mass.items())]


def routed_text(pieces: list[str], labels: list[str]) -> Text:
    """Generated pieces coloured by their dominant expert, then a legend."""
    color = {n: COLORS[i % len(COLORS)] for i, n in enumerate(sorted(set(labels)))}
    out = Text()
    for piece, label in zip(pieces, labels):
        out.append(piece, style=color[label])
    out.append("\n")
    for name, c in color.items():
        out.append(f"[{name}] ", style=c)
    return out
