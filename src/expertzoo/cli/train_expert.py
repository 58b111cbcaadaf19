"""`zoo train-expert --base SPEC --kind KIND --data PATH -o DIR`: train one expert on domain data with the base frozen
(with `--teacher DIR`, first distil it from a trained expert's deltas: how a DiT expert learns), then compare the
held-out NLL of base and expert; writes an expert folder (`{name, kind, from: DIR}`) with metrics.json in it."""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ZooError
from .common import (add_data, add_output, add_prefix_flag, console, key_values, load_data, named_paths, non_negative,
                     pad_id, positive, prefix_for, processes, show, table, write_json)

if TYPE_CHECKING:
    from ..data import Example
    from ..zoo import Zoo

DEFAULT_BASE = "smollm2-135m"  # expertzoo.io.base_models.DEFAULT_BASE (a test keeps them equal)
CHECKPOINTS = "checkpoint"  # inside the output folder while training; gone once the expert folder is written
DISTILLED = "distilled.safetensors"
HELD_OUT_EVERY = 10


def register(sub) -> None:
    p = sub.add_parser("train-expert", help="train one expert (lora, mlp, ffn, dit, ...) on domain data")
    p.add_argument("--base", default=DEFAULT_BASE, help="base model spec")
    p.add_argument("--kind", required=True, help="expert kind: lora, mlp, ffn, dit, ...")
    add_data(p, text="training data (.txt or .jsonl), mixed into one set")
    add_data(p, "--eval-data", required=False,
             text=f"held-out data (default: every {HELD_OUT_EVERY}th example of --data, not trained on)")
    p.add_argument("--name", help="the expert's name (default: from the output folder's name)")
    p.add_argument("--sites", nargs="+", action="extend", default=None,
                   help="sites: mlp, attn, mlp.down_proj, ... (default: mlp); repeatable")
    p.add_argument("--layers", default="all", help="all, '24-29' or '0,3'")
    p.add_argument("--option", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="options of the kind, e.g. --option rank=16 alpha=32; repeatable")
    p.add_argument("--steps", type=non_negative, default=100, help="LM-loss training steps (0 with --teacher: distil only)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--batch-size", type=positive, default=4, help="sequences per step")
    p.add_argument("--max-len", type=positive, default=256, help="tokens per example window")
    p.add_argument("--limit", type=positive, help="at most this many training examples per file, evenly spaced")
    p.add_argument("--eval-limit", type=positive, help="at most this many held-out examples, evenly spaced")
    p.add_argument("--teacher", help="a trained expert folder to distil from first (its deltas at every site)")
    p.add_argument("--distill-steps", type=non_negative, default=500, help="distillation steps with --teacher")
    p.add_argument("--distill-lr", type=float, default=1e-3, help="learning rate of the distillation")
    p.add_argument("--distill-tokens", type=positive, default=8192, help="teacher deltas collected per site")
    p.add_argument("--checkpoint-every", type=non_negative, default=0,
                   help="checkpoint every N steps into OUT/checkpoint (0: never)")
    p.add_argument("--resume", action="store_true", help="go on from the last checkpoint in OUT/checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the expert's initial weights and the data order")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                   help="train on a quantized base: int8 (CPU or GPU) or int4 (GPU) weight-only; the expert stays full precision")
    add_prefix_flag(p)
    add_output(p, "expert")
    p.set_defaults(run=run)


def split_held_out(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """(train, held-out): every HELD_OUT_EVERY-th example is held out."""
    if len(examples) < 2:
        raise ZooError(f"only {len(examples)} example in the data: too few to hold any out; pass --eval-data")
    held = examples[HELD_OUT_EVERY - 1::HELD_OUT_EVERY] or examples[-1:]
    kept = {id(e) for e in held}
    return [e for e in examples if id(e) not in kept], held


def check_out(out: Path, *, force: bool, resume: bool) -> None:
    """The output may be new, empty, an expert folder (replaced with --force), or a folder holding only an
    unfinished run's checkpoints; --resume needs a checkpoint there."""
    from ..io.expert_folder import is_expert_folder
    from ..training.train import latest_checkpoint

    if out.exists() and is_expert_folder(out) and not force:
        raise ZooError(f"{str(out)!r} is already an expert folder; pass --force to replace it, or choose another -o")
    if out.exists() and not is_expert_folder(out):
        if not out.is_dir() or any(p.name != CHECKPOINTS for p in out.iterdir()):
            raise ZooError(f"{str(out)!r} exists and is not an expert folder; choose an empty or new output folder")
    if resume and latest_checkpoint(out / CHECKPOINTS) is None and not (out / CHECKPOINTS / DISTILLED).is_file():
        raise ZooError(f"--resume: no checkpoint in {str(out / CHECKPOINTS)!r}; drop --resume to start afresh")


def default_name(out: Path) -> str:
    return re.sub(r"[^a-z0-9_-]+", "_", out.name.lower()).strip("_") or "expert"


def teacher_spec(folder: str, name: str, base: str, sites: list[str], layers: str) -> dict[str, Any]:
    """The teacher as an expert of the training zoo, taken `from:` its folder, at the student's sites and layers;
    it must come from the same base."""
    from ..io.expert_folder import is_expert_folder, read_expert_meta

    if not is_expert_folder(folder):
        raise ZooError(f"--teacher {folder!r} is not an expert folder (no expert.json); train one with `zoo train-expert`")
    meta = read_expert_meta(folder)
    if meta.get("base", base) != base:
        raise ZooError(f"teacher {folder!r} was trained on base {meta['base']!r}, not {base!r}; pass --base {meta['base']}")
    return {"name": f"{name}_teacher", "kind": meta["kind"], **meta.get("options", {}), "from": str(folder),
            "sites": list(sites), "layers": layers}


def build_zoo(args, name: str) -> Zoo:
    from ..build.assemble import build
    from ..experts import EXPERTS
    from ..io.base_models import load_base

    kind = EXPERTS.get(args.kind)  # an unknown kind is refused before the base is loaded
    experts = [{"name": name, "kind": args.kind, **key_values(args.option, "--option", "rank=16")}]
    if args.teacher and kind.mode != "residual":
        raise ZooError(f"expert kind {args.kind!r} replaces its block; --teacher distils a teacher's deltas into a "
                       "residual expert (lora, mlp, dit); drop --teacher to train it on the data")
    sites = args.sites or ["mlp"]
    if args.teacher:
        experts.append(teacher_spec(args.teacher, name, args.base, sites, args.layers))
    model, tok = load_base(args.base)
    config = {"base": args.base, "sites": sites, "layers": args.layers, "experts": experts,
              "router": {"kind": "fixed", "experts": [name]}, "seed": args.seed, "quantize": args.quantize}
    return build(config, model=model, tokenizer=tok)


def distil(zoo: Zoo, name: str, train: list[Example], args, ckpt: Path) -> dict[str, Any]:
    """Distil `name` from the teacher (or, on --resume, reload the distilled weights); returns its report."""
    import torch
    from safetensors.torch import load_file, save_file

    from ..training.train import distill_error, distill_expert, teacher_deltas

    start = time.perf_counter()
    pairs = teacher_deltas(zoo, f"{name}_teacher", train, max_tokens=args.distill_tokens, batch_size=args.batch_size)
    cached = ckpt / DISTILLED
    student = {f"{l.site.name}.{k}": t for l in zoo.layers_of(name) for k, t in l.experts[name].state_dict().items()}
    if args.resume and cached.is_file():
        state, losses = load_file(cached), []
        with torch.no_grad():
            for key, t in student.items():
                t.copy_(state[key])
    else:
        ranks = processes()  # every rank distils the same student; the main process alone caches it
        losses = distill_expert(zoo, name, pairs, steps=args.distill_steps, lr=args.distill_lr, seed=args.seed,
                                progress=ranks.is_main_process)
        if ranks.is_main_process:
            ckpt.mkdir(parents=True, exist_ok=True)
            tmp = ckpt / f".{DISTILLED}.tmp"
            save_file({k: t.detach().contiguous() for k, t in student.items()}, tmp)
            tmp.replace(cached)
        ranks.wait_for_everyone()
    return {"steps": args.distill_steps, "tokens_per_site": len(next(iter(pairs.values()))[0]),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "rel_error": distill_error(zoo, name, pairs), "seconds": time.perf_counter() - start}


def held_out_nll(zoo: Zoo, held: list[Example], names: dict[str, list[str]], *, progress: bool = True,
                 prefix_cache: bool = True) -> dict[str, float]:
    """NLL of the held-out examples with each routing forced: {label: nll}."""
    from ..evaluation.evaluate import evaluate

    prefix = prefix_for(zoo, held, enabled=prefix_cache, progress=progress)
    out = {}
    for label, forced in names.items():
        with zoo.force_expert(forced):
            out[label] = evaluate(zoo, held, pad_id=pad_id(zoo.tokenizer), batch_size=8, desc=f"held-out {label}",
                                  progress=progress, prefix=prefix)["nll"]
    return out


def run(args) -> int:
    from ..training.train import batch_at, train_expert

    out = Path(args.out)
    train_paths, eval_paths = named_paths(args.data), named_paths(args.eval_data, "--eval-data")
    check_out(out, force=args.force, resume=args.resume)
    ranks = processes()
    name = args.name or default_name(out)
    zoo = build_zoo(args, name)
    train = load_data(train_paths, zoo.tokenizer, args.max_len, args.limit)
    if eval_paths:
        held = load_data(eval_paths, zoo.tokenizer, args.max_len, args.eval_limit)
    else:
        train, held = split_held_out(train)
        held = held[: args.eval_limit] if args.eval_limit else held
    ckpt = out / CHECKPOINTS
    report: dict[str, Any] = {"seconds": {}}
    if args.teacher:
        report["distill"] = distil(zoo, name, train, args, ckpt)
        report["seconds"]["distill"] = report["distill"]["seconds"]
    start, losses = time.perf_counter(), []
    if args.steps:
        used = list({id(e): e for step in range(args.steps)
                     for e in batch_at(train, step, args.batch_size, args.seed)}.values())  # what the run trains on
        prefix = prefix_for(zoo, used, enabled=args.prefix_cache, progress=ranks.is_main_process)
        losses = train_expert(zoo, name, train, steps=args.steps, lr=args.lr,
                              batch_size=args.batch_size, seed=args.seed, checkpoint_dir=ckpt,
                              checkpoint_every=args.checkpoint_every, resume=args.resume, prefix=prefix)
    report["seconds"]["lm"] = time.perf_counter() - start
    labels = {"base": [], "expert": [name], **({"teacher": [f"{name}_teacher"]} if args.teacher else {})}
    nll = held_out_nll(zoo, held, labels, progress=ranks.is_main_process, prefix_cache=args.prefix_cache)
    metrics = summarise(zoo, name, args, train, held, nll, losses, report)
    metrics["processes"] = ranks.num_processes
    if ranks.is_main_process:  # every rank holds the same trained expert
        zoo.save_expert(name, out)
        write_json(metrics, out / "metrics.json")
        show(metrics_table(metrics))
        console.print(f"expert {name!r} ({args.kind}) -> {out}: use it as {{name: {name}, kind: {args.kind}, from: {out}}}")
    ranks.wait_for_everyone()
    return 0


def cost(zoo: Zoo, name: str) -> dict[str, Any]:
    """Kind, FLOPs per token and parameters of one expert, summed over its sites."""
    return {"kind": next(e.kind for e in zoo.zoo_config.experts if e.name == name),
            "flops_per_token": sum(layer.experts[name].flops_per_token() for layer in zoo.layers_of(name)),
            "parameters": sum(p.numel() for p in zoo.expert_parameters(name))}


def summarise(zoo: Zoo, name: str, args, train: list[Example], held: list[Example], nll: dict[str, float],
              losses: list[float], report: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: held-out NLL of base / expert (/ teacher), gain, cost, training record."""
    spec = next(e for e in zoo.zoo_config.experts if e.name == name)
    metrics: dict[str, Any] = {
        "name": name, "kind": args.kind, "options": spec.options.model_dump(), "base": args.base,
        "sites": [layer.site.name for layer in zoo.layers_of(name)], "data": file_names(args.data),
        "eval_data": file_names(args.eval_data) if args.eval_data else f"every {HELD_OUT_EVERY}th example of --data",
        "train_examples": len(train), "eval_examples": len(held),
        "eval_tokens": sum(sum(1 for t in e.labels[1:] if t != -100) for e in held),
        "nll": nll, "gain": nll["base"] - nll["expert"], **cost(zoo, name),
        "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "max_len": args.max_len,
        "losses": losses, "train_seconds": report["seconds"],
    }
    if args.teacher:
        gain = nll["base"] - nll["teacher"]
        metrics["teacher"] = {"folder": str(args.teacher), **cost(zoo, f"{name}_teacher")}
        metrics["recovery"] = metrics["gain"] / gain if abs(gain) > 1e-9 else None
        metrics["distill"] = report["distill"]
    return metrics


def file_names(items: list[str]) -> str | list[str]:
    """The data files of a --data option as metrics.json records them: one path, or a list of several."""
    paths = list(named_paths(items).values())
    return paths[0] if len(paths) == 1 else paths


def metrics_table(m: dict[str, Any]) -> Any:
    title = f"{m['name']} ({m['kind']}) on {m['eval_examples']} held-out examples ({m['eval_tokens']:,} tokens)"
    out = table("model", "held-out NLL", "vs base", "FLOPs/token", title=title)
    flops = {"base": "-", "expert": f"{m['flops_per_token']:,}"}
    if "teacher" in m:
        flops["teacher"] = f"{m['teacher']['flops_per_token']:,}"
    for label, value in m["nll"].items():
        out.add_row(label, f"{value:.4f}", f"{value - m['nll']['base']:+.4f}", flops[label])
    return out
