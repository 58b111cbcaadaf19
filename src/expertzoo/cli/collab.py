"""`zoo collab --base SPEC --assistant SPEC --data PATH -o DIR`: train a Co-LLM deferral head between two models that
share a tokenizer (either may be a zoo folder), choose eta on validation data, save a collab folder; `zoo generate`
and `zoo eval` on that folder defer token by token (the helpers they call live here)."""
from __future__ import annotations

from typing import Any

from rich.text import Text

from .common import (add_data, add_output, check_output, console, load_data, named_paths, non_negative, pad_id,
                     positive, processes, show, table)
from .train_expert import split_held_out


def register(sub) -> None:
    p = sub.add_parser("collab", help="train a Co-LLM deferral head between a base and an assistant model")
    p.add_argument("--base", required=True, help="base spec or zoo folder (runs every token)")
    p.add_argument("--assistant", required=True, help="assistant spec or zoo folder (writes the deferred tokens)")
    add_data(p, text="training data (.txt or .jsonl), mixed into one set")
    add_data(p, "--eval-data", required=False,
             text="validation data for eta (default: every 10th example of --data, not trained on)")
    p.add_argument("--steps", type=non_negative, default=300, help="head training steps")
    p.add_argument("--weak-steps", type=non_negative, default=100, help="of which weakly supervised first")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate of the head")
    p.add_argument("--target-rate", type=float, help="deferral rate to aim for on validation (default: eta of lowest NLL)")
    p.add_argument("--max-len", type=positive, default=256, help="tokens per example window")
    p.add_argument("--limit", type=positive, help="at most this many training examples per file, evenly spaced")
    p.add_argument("--batch-size", type=positive, default=8, help="sequences per step")
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    add_output(p, "collab")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..extras.collab import COLLAB_FILE, check_vocab, load_side, train_collab

    train_paths, eval_paths = named_paths(args.data), named_paths(args.eval_data, "--eval-data")
    check_output(args.out, force=args.force, marker=COLLAB_FILE, what="collab")
    base, assistant = load_side(args.base), load_side(args.assistant)
    check_vocab(base[1], assistant[1])
    train = load_data(train_paths, base[1], args.max_len, args.limit)
    train, valid = (train, load_data(eval_paths, base[1], args.max_len)) if eval_paths else split_held_out(train)
    collab = train_collab(base, assistant, train, valid, steps=args.steps, weak_steps=args.weak_steps,
                          lr=args.lr, target_rate=args.target_rate, batch_size=args.batch_size, seed=args.seed)
    ranks = processes()  # the head is small: every rank trains the same one, the main process alone writes it
    if ranks.is_main_process:
        collab.save(args.out)
        show(report_table({"validation": collab.meta["validation"]}, f"Co-LLM deferral at eta={collab.eta:.4f}"))
        console.print(f"collab folder -> {args.out}: try `zoo generate {args.out} --prompt '...'`")
    ranks.wait_for_everyone()
    return 0


def report_table(results: dict[str, dict[str, Any]], title: str) -> Any:
    out = table("dataset", "tokens", "NLL deferral", "NLL marginal", "NLL base", "NLL assistant", "deferral rate",
                title=title)
    for name, r in results.items():
        out.add_row(name, f"{r['tokens']:,}", f"{r['nll']:.4f}", f"{r['nll_marginal']:.4f}", f"{r['nll_base']:.4f}",
                    f"{r['nll_assistant']:.4f}", f"{r['deferral_rate']:.1%}")
    return out


def evaluate_folder(directory: str, paths: dict[str, str], *, max_len: int, limit: int | None,
                    batch_size: int) -> dict[str, Any]:
    """`zoo eval` on a collab folder: per dataset, the NLL of the deferral mixture and the deferral rate."""
    from ..data import load_examples
    from ..extras.collab import load_collab

    collab = load_collab(directory)
    tok = collab.tokenizer
    results = {name: collab.evaluate(load_examples(path, tok, max_len, limit), pad_id=pad_id(tok), batch_size=batch_size)
               for name, path in paths.items()}
    show(report_table(results, f"Co-LLM deferral at eta={collab.eta:.4f}"))
    return {"collab": str(directory), "base": collab.meta["base"], "assistant": collab.meta["assistant"],
            "eta": collab.eta, "datasets": results}


def generate_folder(directory: str, prompt: str, *, max_new_tokens: int, chat: bool, show: bool) -> None:
    """`zoo generate` on a collab folder: prints the text, deferred tokens marked when `show`."""
    import torch

    from ..extras.collab import load_collab

    collab = load_collab(directory)
    tok = collab.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True) \
        if chat and getattr(tok, "chat_template", None) else prompt
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    new, deferred = collab.generate(ids, max_new_tokens=max_new_tokens, eos_id=tok.eos_token_id)
    out = Text(prompt, style="bold")
    for token, defer in zip(new, deferred):
        out.append(tok.decode([token], skip_special_tokens=True), style="magenta" if defer and show else "")
    console.print(out)
    rate = sum(deferred) / max(len(deferred), 1)
    console.print(f"[dim]{sum(deferred)} of {len(deferred)} tokens deferred to the assistant ({rate:.0%})"
                  + (" — shown in magenta" if show else "") + "[/dim]")
