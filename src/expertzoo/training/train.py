"""Training loops on accelerate: one expert (router bypassed, base frozen) or the routers (experts frozen).
Loss = mean token NLL over the global batch + weighted router aux losses. Progress bar with loss; atomic
checkpoints (trained weights, optimiser, schedule, RNG, data position) every N steps; `resume=True` goes on
from the last one. Launched as several processes (torchrun / accelerate launch), each rank takes its share
of every global batch and the result equals a one-process run with the same global batch."""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..io.atomic import atomic_dir
from ..data import Example, collate, feed, pad_id
from ..data.hidden import PrefixCache
from ..errors import ZooError
from ..evaluation.evaluate import token_nll
from ..zoo import Zoo

CHECKPOINT_PREFIX = "step-"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder `step-NNNNNNNN` under `root` (each is written atomically)."""
    found = sorted(Path(root).glob(f"{CHECKPOINT_PREFIX}*")) if Path(root).is_dir() else []
    return found[-1] if found else None


@contextlib.contextmanager
def only_training(zoo: Zoo, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients for `params` alone while inside; every zoo parameter's flag is restored after."""
    everything = list(zoo.parameters())
    before = [p.requires_grad for p in everything]
    chosen = {id(p) for p in params}
    for p in everything:
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag in zip(everything, before):
            p.requires_grad_(flag)


def batch_at(examples: list[Example], step: int, batch_size: int, seed: int) -> list[Example]:
    """The global batch of `step`: shuffled epochs fixed by `seed`, so a resumed run sees the same data."""
    if not examples:
        raise ZooError("no training examples; the data file is empty or every document is shorter than 2 tokens")
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(i, len(examples))
        order = list(range(len(examples)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(examples[order[pos]])
    return out


def fit(zoo: Zoo, params: list[torch.nn.Parameter], examples: list[Example], *, steps: int, lr: float,
        batch_size: int = 4, balance_weight: float = 0.0, z_weight: float = 0.0, seed: int = 0,
        balance_schedule: Callable[[int, int], float] | None = None, checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 0, resume: bool = False, desc: str = "train", progress: bool = True,
        prefix: PrefixCache | None = None) -> list[float]:
    """AdamW on `params` for `steps` steps; returns the NLL of every step (a resumed run: of all steps).

    `balance_schedule(step, steps)` multiplies `balance_weight` per step (e.g. an AdaMoE annealing). With `prefix`
    (a PrefixCache of `examples`), the frozen layers below the first site are not run again: same losses, faster.
    """
    if not params:
        raise ZooError("nothing to train: the parameter list is empty (is the expert or router present?)")
    names = {id(p): n for n, p in zoo.named_parameters()}
    acc = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True lets torchrun start multi-CPU (gloo)
    if batch_size < acc.num_processes:
        raise ZooError(f"batch size {batch_size} is smaller than the {acc.num_processes} processes launched; each "
                       f"takes its share of every batch: give a batch size of at least {acc.num_processes}")
    torch.manual_seed(seed)
    pad = pad_id(zoo.tokenizer)
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / warm))
    start, losses = 0, []
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    last = latest_checkpoint(ckpt) if resume and ckpt is not None else None
    if last is not None:
        start, losses = _load_checkpoint(last, params, names, optim, sched)
    outside = [p for p in params if id(p) not in names]  # not the zoo's (e.g. phatgoose's gate vectors)
    with only_training(zoo, params), prefix.running() if prefix is not None else contextlib.nullcontext():
        # DDP (torchrun, accelerate launch) averages the gradients of the zoo's own trained parameters; it refuses a
        # model with none, and never sees tensors outside it: those are averaged over the ranks below.
        model = acc.prepare(zoo) if len(outside) < len(params) else zoo.to(acc.device)
        optim = acc.prepare(optim)
        zoo.train()
        bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps,
                   disable=not progress or not acc.is_local_main_process)
        for step in bar:
            chosen = batch_at(examples, step, batch_size, seed)
            batch = prefix.batch(chosen) if prefix is not None else collate(chosen, pad)
            loss, nll = _step_loss(model, zoo, batch, acc, balance_weight * (balance_schedule(step, steps)
                                   if balance_schedule else 1.0), z_weight)
            optim.zero_grad(set_to_none=True)
            acc.backward(loss)
            if acc.num_processes > 1:
                for p in outside:
                    p.grad = acc.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
            acc.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            losses.append(nll)
            bar.set_postfix(loss=f"{nll:.3f}")
            if ckpt is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and acc.is_main_process:
                _save_checkpoint(ckpt, step + 1, losses, params, names, optim, sched)
            acc.wait_for_everyone()
        bar.close()
    zoo.eval()
    return losses


def _step_loss(model, zoo: Zoo, batch: dict[str, torch.Tensor], acc: Accelerator, balance: float,
               z: float) -> tuple[torch.Tensor, float]:
    """This rank's share of the global batch (rows rank::ranks, padded to the global batch's length); scaled so
    DDP's gradient mean equals the global-token mean. Router aux losses are means over this rank's positions,
    weighted by its share of the rows: exact for the z-loss; the balance loss sums its batch fractions over the
    ranks itself (routing.balance_loss), so it is exact too."""
    total = int((batch["labels"][:, 1:] != -100).sum())
    mine = {k: v[acc.process_index::acc.num_processes].to(acc.device) for k, v in batch.items()}
    inputs = {k: mine[k] for k in ("input_ids", "inputs_embeds") if k in mine}  # inputs_embeds: from a prefix cache
    logits = model(**inputs, attention_mask=mine["attention_mask"]).logits
    nll_sum, _ = token_nll(logits, mine["labels"])
    nll = nll_sum * acc.num_processes / max(total, 1)
    aux = zoo.aux_losses()
    share = len(mine["labels"]) * acc.num_processes / len(batch["labels"])  # 1.0 alone or on an even split
    loss = nll + balance * aux.get("balance", 0.0) + share * z * aux.get("z", 0.0)
    global_nll = acc.reduce(nll_sum.detach(), reduction="sum") / max(total, 1)
    return loss, float(global_nll)


def _save_checkpoint(root: Path, step: int, losses: list[float], params, names, optim, sched) -> None:
    """A new folder per checkpoint, renamed into place when whole; older ones are removed after."""
    tensors = {f"param.{names[id(p)]}": p.detach().cpu().contiguous() for p in params}
    state = optim.state_dict()
    for idx, slots in state["state"].items():
        for key, t in slots.items():
            tensors[f"optim.{idx}.{key}"] = torch.as_tensor(t).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.random.get_rng_state()
    meta = {"step": step, "losses": losses, "param_groups": state["param_groups"], "scheduler": sched.state_dict()}
    with atomic_dir(root / f"{CHECKPOINT_PREFIX}{step:08d}") as tmp:
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(meta, default=str), encoding="utf-8")
    for old in sorted(root.glob(f"{CHECKPOINT_PREFIX}*"))[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, params, names, optim, sched) -> tuple[int, list[float]]:
    try:
        tensors = load_file(path / "state.safetensors")
        meta = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ZooError(f"checkpoint {str(path)!r} is unreadable ({str(err).splitlines()[0]}); delete it to start over")
    with torch.no_grad():
        for p in params:
            key = f"param.{names[id(p)]}"
            if key not in tensors or tensors[key].shape != p.shape:
                raise ZooError(f"checkpoint {str(path)!r} does not match this run ({key}); delete it or fix the run")
            p.copy_(tensors[key])
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            slots.setdefault(int(idx), {})[name] = t
    optim.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    torch.random.set_rng_state(tensors["rng.torch"])
    return int(meta["step"]), list(meta["losses"])


def train_expert(zoo: Zoo, name: str, examples: list[Example], *, steps: int, lr: float = 1e-3, **kw) -> list[float]:
    """Train one expert on its data with every token forced to it; base, router and other experts frozen."""
    with zoo.force_expert(name):
        return fit(zoo, zoo.expert_parameters(name), examples, steps=steps, lr=lr, desc=f"expert {name}", **kw)


def train_router(zoo: Zoo, examples: list[Example], *, steps: int, lr: float = 1e-2, balance_weight: float = 0.01,
                 z_weight: float = 0.001, params: list[torch.nn.Parameter] | None = None, **kw) -> list[float]:
    """Train the router(s) (plus any extra `params`, e.g. the embeddings) on mixed data with the LM loss
    plus the balancing and z losses."""
    return fit(zoo, zoo.router_parameters() + list(params or []), examples, steps=steps, lr=lr,
               balance_weight=balance_weight, z_weight=z_weight, desc="router", **kw)


@torch.no_grad()
def teacher_deltas(zoo: Zoo, teacher: str, examples: list[Example], *, max_tokens: int = 8192,
                   batch_size: int = 4) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per site: inputs x [N,d_in] and the teacher's output deltas [N,d_out] (the site's output with `teacher`
    forced, minus base(x)), over the real tokens of `examples`, at most `max_tokens` per site. Kind-agnostic:
    a residual teacher gives its delta, a replace teacher (ffn) its output minus the base's."""
    pad = pad_id(zoo.tokenizer)
    found: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {l.site.name: ([], []) for l in zoo.layers}

    def grab(layer, args, out):
        x = args[0]  # [B,S,d_in]
        keep = zoo.ctx.batch_mask(x).reshape(-1)  # [B*S] real tokens
        h = x.reshape(-1, x.shape[-1])[keep]  # [n,d_in]
        xs, ys = found[layer.site.name]
        xs.append(h.float().cpu())
        ys.append((out.reshape(-1, out.shape[-1])[keep] - layer.base_layer(h)).float().cpu())

    hooks = [layer.register_forward_hook(grab) for layer in zoo.layers]
    was_training = zoo.training
    zoo.eval()
    try:
        with zoo.force_expert(teacher):
            feed(zoo, examples, pad_id=pad, batch_size=batch_size, max_tokens=max_tokens)
    finally:
        for hook in hooks:
            hook.remove()
        zoo.train(was_training)
    return {site: (torch.cat(xs)[:max_tokens], torch.cat(ys)[:max_tokens]) for site, (xs, ys) in found.items()}


def _warm_cosine(step: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up over the first 5% of steps, then cosine decay to 0."""
    warm = max(1, steps // 20)
    return min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))


def _sample(x: torch.Tensor, y: torch.Tensor, n: int, g: torch.Generator,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """n random (x, y) pairs, moved to the experts' device.  x: [N,d_in], y: [N,d_out] -> [n,d_in], [n,d_out]"""
    idx = torch.randint(0, len(x), (n,), generator=g)
    return x[idx].to(device), y[idx].to(device)


def _distill_loss(student: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The student's own distillation loss (a DiT: denoising), else the MSE of its output."""
    own = getattr(student, "distill_loss", None)
    return own(x, y, g) if own is not None else torch.nn.functional.mse_loss(student(x), y)


def distill_expert(zoo: Zoo, name: str, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], *, steps: int,
                   lr: float = 1e-3, batch_tokens: int = 256, seed: int = 0, progress: bool = True) -> list[float]:
    """Train residual expert `name` at every site on (x, teacher delta) `pairs` from `teacher_deltas`: AdamW,
    warm-up then cosine decay, `batch_tokens` random pairs per site and step; returns the mean loss per step.
    Students with `set_scale` (DiT) are first told the RMS of their targets."""
    students = {l.site.name: l.experts[name] for l in zoo.layers_of(name)}
    if any(s.mode != "residual" for s in students.values()):
        raise ZooError(f"expert {name!r} replaces its block; distillation from a teacher's deltas trains residual "
                       "experts (lora, mlp, dit); train it on data instead")
    for site, student in students.items():
        if hasattr(student, "set_scale"):
            student.set_scale(pairs[site][1])
    params = zoo.expert_parameters(name)
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _warm_cosine(s, steps))
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    with only_training(zoo, params):
        for student in students.values():
            student.train()
        bar = tqdm(range(steps), desc=f"distill {name}", disable=not progress)
        for _ in bar:
            loss = torch.stack([_distill_loss(students[site], *_sample(x, y, batch_tokens, g, zoo.device), g)
                                for site, (x, y) in pairs.items() if site in students]).mean()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
    zoo.eval()
    return losses


@torch.no_grad()
def distill_error(zoo: Zoo, name: str, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Relative squared error of expert `name`'s deltas against the teacher's, over all sites: sum |s(x)-y|^2 / sum |y|^2."""
    err = ref = 0.0
    for layer in zoo.layers_of(name):
        x, y = (t.to(zoo.device) for t in pairs[layer.site.name])
        err += float((layer.experts[name](x) - y).pow(2).sum())
        ref += float(y.pow(2).sum())
    return err / max(ref, 1e-12)
