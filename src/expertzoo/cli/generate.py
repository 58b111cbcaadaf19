"""`zoo generate DIR --prompt TEXT [--max-new-tokens N] [--show-routing] [--compile]`: greedy generation with the
KV cache (`--compile`: a static one, decode steps compiled); prints the prompt, then the new text without special
tokens."""
from __future__ import annotations

from typing import Any

from rich.text import Text

from ..errors import ZooError
from .common import add_dtype, console, is_zoo, load_model, positive, warn

NOT_CAUSAL = ("expert_choice",)  # router kinds whose choice for a token depends on the tokens after it


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a zoo (or a base)")
    p.add_argument("dir", help="zoo folder or base spec")
    p.add_argument("--prompt", required=True, help="prompt text (not empty)")
    p.add_argument("--max-new-tokens", type=positive, default=64, help="tokens to generate at most")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--show-routing", action="store_true", help="mark each new token with the expert that weighed most")
    p.add_argument("--compile", action="store_true",
                   help="static KV cache and decode steps through torch.compile (fullgraph; the first call compiles)")
    add_dtype(p)
    add_steering(p)
    p.set_defaults(run=run)


def add_steering(p, *, per_dataset: bool = False) -> None:
    """--disable-expert / --force-expert (repeatable): steer a zoo's routing for this command (`per_dataset`: a
    forced expert may be given for one dataset as DATASET=EXPERT)."""
    p.add_argument("--disable-expert", action="append", default=[], metavar="NAME", help="never route to NAME (repeatable)")
    if per_dataset:
        p.add_argument("--force-expert", nargs="+", action="extend", default=[], metavar="[DATASET=]NAME",
                       help="route every token to NAME, equal weights when repeated; DATASET=NAME forces NAME on that "
                            "dataset only (one run gives every dataset's oracle); repeatable")
        return
    p.add_argument("--force-expert", action="append", default=[], metavar="NAME",
                   help="route every token to NAME, equal weights when repeated (repeatable)")


def steer(model: Any, what: str, disable: list[str], force: list[str], *, check_only: bool = False) -> None:
    """Apply the steering flags to a loaded zoo (`check_only`: only check them); a clear error for a model that is
    not one, an unknown expert, or one both forced and disabled."""
    if not (disable or force):
        return
    if not is_zoo(model):
        raise ZooError(f"--disable-expert / --force-expert steer a zoo's experts, but {what!r} is not a zoo folder; "
                       "give a folder made by `zoo build`")
    both = sorted(set(disable) & set(force))
    if both:
        raise ZooError(f"expert {both[0]!r} is both forced and disabled; drop one of the two flags")
    if check_only:
        model._check_names([*disable, *force])
        return
    for name in disable:
        model.disable_expert(name)
    if force:
        model.force_expert(force)


def router_warnings(model: Any, *, generating: bool = False, batch_size: int = 1) -> None:
    """Warn where the zoo's router runs outside its documented limits: a router that is not causal used to
    generate, a router whose decisions depend on batch-mates used with batches of several sequences."""
    if not is_zoo(model) or not model.layers:
        return
    kind = model.zoo_config.router.kind
    if generating and kind in NOT_CAUSAL:
        warn(f"the {kind} router is not causal (a token's experts depend on the tokens after it), so generated text "
             "can differ from what a full forward gives; use it for scoring and prefill, or choose another router")
    if batch_size > 1 and not all(router.batch_invariant for router in model.routers()):
        warn(f"the {kind} router's decisions depend on the other sequences of a batch, so results change with "
             f"--batch-size {batch_size}; pass --batch-size 1 (or give the router per_sequence: true)")


def run(args) -> int:
    from ..evaluation.generate import generate, routed_text
    from ..extras.collab import is_collab_folder
    from .collab import generate_folder

    if not args.prompt.strip():
        raise ZooError("--prompt is empty; give some text to continue, e.g. --prompt 'def f(x):'")
    if is_collab_folder(args.dir):
        if args.disable_expert or args.force_expert:
            raise ZooError(f"{args.dir!r} is a collab folder; steer the zoos inside it, not the collab")
        generate_folder(args.dir, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat, show=args.show_routing)
        return 0
    model, tok = load_model(args.dir, args.dtype)
    steer(model, args.dir, args.disable_expert, args.force_expert)
    router_warnings(model, generating=True)
    text, labels = generate(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
                            show_routing=args.show_routing, compile=args.compile)
    if labels is None:
        console.print(Text(args.prompt, style="bold") + Text(text))
        return 0
    console.print(Text(args.prompt, style="bold") + routed_text(text, labels))
    return 0
