"""`zoo train-router DIR --data PATH ... --steps N -o DIR2`: train the router(s) of a saved zoo (optionally the
embedding layer too) with the LM loss + Switch balancing loss + router z-loss, with checkpoints and --resume."""
from __future__ import annotations

from pathlib import Path

from ..errors import ZooError
from .common import (add_data, add_output, check_output, console, load_data, named_paths, non_negative, positive,
                     processes)


def register(sub) -> None:
    p = sub.add_parser("train-router", help="train a zoo's router on mixed data (experts and base frozen)")
    p.add_argument("dir", help="zoo folder")
    add_data(p, text=".txt or .jsonl files, mixed into one training set")
    p.add_argument("--steps", type=positive, required=True, help="optimiser steps")
    p.add_argument("--train-embeddings", action="store_true",
                   help="also train the input embedding layer (saved with the zoo); as in the moetify paper")
    p.add_argument("--balance-weight", type=float, default=0.01, help="Switch load-balancing loss weight")
    p.add_argument("--z-weight", type=float, default=0.001, help="router z-loss weight")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    p.add_argument("--batch-size", type=positive, default=4, help="sequences per step")
    p.add_argument("--max-len", type=positive, default=256, help="tokens per example window")
    p.add_argument("--limit", type=positive, help="at most this many examples per data file, evenly spaced")
    p.add_argument("--seed", type=int, default=0, help="data order and noise seed")
    p.add_argument("--checkpoint-every", type=non_negative, default=0,
                   help="save a resumable checkpoint every N steps (0: never)")
    p.add_argument("--checkpoint-dir", help="where checkpoints go (default: OUT.ckpt next to the output)")
    p.add_argument("--resume", action="store_true", help="go on from the last checkpoint in the checkpoint folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_output(p)
    p.set_defaults(run=run)


def checkpoint_folder(args) -> Path:
    """--checkpoint-dir, or OUT.ckpt; with --resume it must hold a checkpoint."""
    from ..training.train import latest_checkpoint

    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(f"{str(args.out).rstrip('/')}.ckpt")
    if args.resume and latest_checkpoint(ckpt) is None:
        raise ZooError(f"--resume: no checkpoint in {str(ckpt)!r}; drop --resume to start afresh, or point "
                       "--checkpoint-dir at the folder of the run to go on with")
    return ckpt


def run(args) -> int:
    from ..build.load import load
    from ..training.train import train_router

    paths = named_paths(args.data)
    check_output(args.out, force=args.force)
    ckpt = checkpoint_folder(args)
    zoo = load(args.dir)
    if not zoo.router_parameters() and not args.train_embeddings:
        raise ZooError(f"the {zoo.zoo_config.router.kind} router of {args.dir!r} has no trainable parameters, so "
                       "there is nothing to train; give the zoo a router with weights (e.g. router: {kind: learned}), "
                       "or fit a data-built one with `zoo fit-router`")
    examples = load_data(paths, zoo.tokenizer, args.max_len, args.limit)
    extra = [zoo.model.get_input_embeddings().weight] if args.train_embeddings else []
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
        console.print(f"router trained {len(losses)} steps on {len(examples)} examples: NLL {losses[0]:.4f} -> "
                      f"{losses[-1]:.4f} -> {args.out}")
    ranks.wait_for_everyone()
    return 0
