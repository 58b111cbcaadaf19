"""`zoo train-router DIR --data PATH ... --steps N -o DIR2`: train the router(s) of a saved zoo (optionally the
embedding layer too) with the LM loss + Switch balancing loss + router z-loss, with checkpoints and --resume."""
from __future__ import annotations

from pathlib import Path

from ..data import load_examples
from ..training.train import train_router
from ..build.load import load
from .common import console, processes


def register(sub) -> None:
    p = sub.add_parser("train-router", help="train a zoo's router on mixed data (experts and base frozen)")
    p.add_argument("dir", help="zoo folder")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help=".txt or .jsonl files (or NAME=PATH), mixed into one training set")
    p.add_argument("--steps", type=int, required=True, help="optimiser steps")
    p.add_argument("--train-embeddings", action="store_true",
                   help="also train the input embedding layer (saved with the zoo); as in the moetify paper")
    p.add_argument("--balance-weight", type=float, default=0.01, help="Switch load-balancing loss weight (default 0.01)")
    p.add_argument("--z-weight", type=float, default=0.001, help="router z-loss weight (default 0.001)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per example window (default 256)")
    p.add_argument("--limit", type=int, help="at most this many examples per data file, evenly spaced")
    p.add_argument("--seed", type=int, default=0, help="data order and noise seed (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    p.add_argument("--checkpoint-dir", help="where checkpoints go (default: OUT.ckpt next to the output)")
    p.add_argument("--resume", action="store_true", help="go on from the last checkpoint in the checkpoint folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--out", required=True, help="output zoo folder")
    p.set_defaults(run=run)


def run(args) -> int:
    zoo = load(args.dir)
    paths = [item.partition("=")[2] or item for item in args.data]
    examples = [e for path in paths for e in load_examples(path, zoo.tokenizer, args.max_len, args.limit)]
    extra = []
    if args.train_embeddings:
        extra = [zoo.model.get_input_embeddings().weight]
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(f"{str(args.out).rstrip('/')}.ckpt")
    losses = train_router(zoo, examples, steps=args.steps, lr=args.lr, balance_weight=args.balance_weight,
                          z_weight=args.z_weight, params=extra, batch_size=args.batch_size, seed=args.seed,
                          checkpoint_dir=ckpt if args.checkpoint_every or args.resume else None,
                          checkpoint_every=args.checkpoint_every, resume=args.resume, progress=not args.quiet)
    if args.train_embeddings:
        names = {id(p): n for n, p in zoo.model.named_parameters()}
        zoo.mark_base_params([names[id(p)] for p in extra])
    ranks = processes()
    if ranks.is_main_process:  # every rank holds the same trained router
        zoo.save(args.out)
        if losses:
            console.print(f"router trained {len(losses)} steps on {len(examples)} examples: NLL {losses[0]:.4f} -> "
                          f"{losses[-1]:.4f} -> {args.out}")
    ranks.wait_for_everyone()
    return 0
