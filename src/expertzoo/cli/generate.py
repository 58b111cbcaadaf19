"""`zoo generate DIR --prompt TEXT [--max-new-tokens N] [--show-routing]`: greedy generation with the KV cache."""
from __future__ import annotations

from typing import Any

from ..errors import ZooError
from ..evaluation.generate import generate, routed_text
from ..extras.collab import is_collab_folder
from ..zoo import Zoo
from .collab import generate_folder
from .common import console, load_model


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
