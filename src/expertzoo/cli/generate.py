"""`zoo generate DIR --prompt TEXT [--max-new-tokens N] [--show-routing]`: greedy generation with the KV cache."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from rich.text import Text

from ..collab import is_collab_folder
from ..errors import ZooError
from ..zoo import Zoo
from .collab import generate_folder
from .common import console, load_model

COLORS = ("cyan", "magenta", "green", "yellow", "blue", "red")


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a zoo (or a base)")
    p.add_argument("dir", help="zoo folder or base spec")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--show-routing", action="store_true", help="mark each new token with the expert that weighed most")
    add_steering(p)
    p.set_defaults(run=run)


def add_steering(p) -> None:
    """--disable-expert / --force-expert (repeatable): steer a zoo's routing for this command."""
    p.add_argument("--disable-expert", action="append", default=[], metavar="NAME", help="never route to NAME (repeatable)")
    p.add_argument("--force-expert", action="append", default=[], metavar="NAME",
                   help="route every token to NAME, equal weights when repeated (repeatable)")


def steer(model: Any, what: str, disable: list[str], force: list[str]) -> None:
    """Apply the steering flags to a loaded zoo; a clear error for a model that is not one."""
    if not (disable or force):
        return
    if not isinstance(model, Zoo):
        raise ZooError(f"--disable-expert / --force-expert steer a zoo's experts, but {what!r} is not a zoo folder; "
                       "give a folder made by `zoo build`")
    both = sorted(set(disable) & set(force))
    if both:
        raise ZooError(f"expert {both[0]!r} is both forced and disabled; drop one of the two flags")
    for name in disable:
        model.disable_expert(name)
    if force:
        model.force_expert(force)


def generate(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int, chat: bool = False,
             show_routing: bool = False) -> tuple[str, list[str] | None]:
    """Greedy continuation of `prompt`; with `show_routing`, the dominant expert of each new token."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if show_routing and isinstance(model, Zoo):
        with torch.no_grad(), model.trace() as trace:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        labels = dominant_experts(trace.records, model.expert_names)
    else:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        labels = None
    new = out[0, ids.shape[1]:]
    pieces = [tokenizer.decode(t) for t in new.tolist()]
    return "".join(pieces) if labels is None else pieces, labels


def dominant_experts(records: list[dict], names: list[str]) -> list[str]:
    """Per forward step, the expert with the most routing weight at the last position, over all sites."""
    mass: dict[int, torch.Tensor] = defaultdict(lambda: torch.zeros(len(names) + 1))
    for rec in records:
        idx, w = rec["indices"][-1], rec["weights"][-1]  # last token: [k]
        for i, wi in zip(idx.tolist(), w.tolist()):
            mass[rec["step"]][i if i >= 0 else len(names)] += wi if i != -1 else 0.0
    return [(names + ["base"])[int(m.argmax())] if m.sum() > 0 else "base" for _, m in sorted(mass.items())]


def run(args) -> int:
    if is_collab_folder(args.dir):
        if args.disable_expert or args.force_expert:
            raise ZooError(f"{args.dir!r} is a collab folder; steer the zoos inside it, not the collab")
        generate_folder(args.dir, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat, show=args.show_routing)
        return 0
    model, tok = load_model(args.dir)
    steer(model, args.dir, args.disable_expert, args.force_expert)
    text, labels = generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
                            show_routing=args.show_routing)
    if labels is None:
        console.print(text, markup=False)
        return 0
    console.print(routed_text(text, labels))
    return 0


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
