"""The zoo study on SmolLM2-135M: fourteen trained domains, two general-English sets not in man-page format, and how
expert type, number of experts and routing mechanism trade task gains against the base's general ability.

Every step is cached under ~/.cache/expertzoo/study/<profile> (trained experts, fitted routers' measurements,
per-window NLLs) and a rerun redoes only what is missing; each step prints a progress line with an ETA.

    python experiments/zoo_study.py                 # the full study (hours on CPU); writes docs/results/zoo-study.*
    python experiments/zoo_study.py --smoke         # tiny model, three domains, few steps: the pipeline end to end
    python experiments/zoo_study.py --report-only   # the report from what is cached

Data it needs (checked at the start, with the command that installs what is missing):
    apt-get install manpages-fr manpages-es manpages-it manpages-pt-br manpages-de manpages-ja manpages-pl \
        wordnet-base python3-doc emacs-el perl-modules-5.36 texlive-latex-base linux-libc-dev libc6-dev
    npm install --prefix ~/.cache/expertzoo/npm typescript@5
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_report  # noqa: E402
from zoo_smollm2 import Measured, merged_deltas  # noqa: E402

import expertzoo as ez  # noqa: E402
from expertzoo.build.activations import collect_inputs  # noqa: E402
from expertzoo.data import IGNORE, Example, read_documents, tokenize  # noqa: E402
from expertzoo.data.corpora import prepare  # noqa: E402
from expertzoo.data.hidden import PrefixCache, prefix_cache  # noqa: E402
from expertzoo.errors import ZooError  # noqa: E402
from expertzoo.extras.collab import TokenFeatures, choose_eta, train_head  # noqa: E402
from expertzoo.io.atomic import atomic_write_text  # noqa: E402
from expertzoo.io.base_models import cache_dir  # noqa: E402
from expertzoo.nn.routing import balance_anneal  # noqa: E402
from expertzoo.routers.base import ROUTERS as ROUTER_KINDS  # noqa: E402
from expertzoo.training.fit import gates_applied  # noqa: E402
from expertzoo.training.train import distill_expert, fit as train_params, teacher_deltas  # noqa: E402
from expertzoo.zoo import router_sites  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
KEPT = ROOT / "experiments" / "zoo-study-kept"
DOMAINS = ["code", "math", "man:fr", "c-headers", "man:ja", "perl", "man:de", "elisp", "man:es", "typescript",
           "man:it", "latex", "man:pl", "man:pt_BR"]  # interleaved families: every prefix mixes code and languages
ENGLISH = ["wordnet", "python-doc"]
PROFILES: dict[str, dict[str, Any]] = {
    "full": {"base": "smollm2-135m", "layers": "24-29", "domains": DOMAINS, "english": ENGLISH, "max_len": 128,
             "batch": 4, "train_windows": 400, "val_windows": 24, "eval_tokens": 10_000, "min_steps": 100,
             "max_steps": 400, "check_every": 25, "lr": 2e-3, "rank": 16, "kinds_domains": 3, "n_list": [2, 4, 8],
             "router_steps": 200, "gate_steps": 100, "fit_windows": 64, "max_tokens": 8192, "collab_windows": 64,
             "distill_steps": 400, "fit_steps": None,
             "gsm8k": 300},  # batched 16 at a time: ~2 s a problem on 2 CPU cores (--gsm8k 0 skips it)
    "smoke": {"base": "tiny:llama", "layers": "1", "domains": ["stdlib:json", "stdlib:email", "math"],
              "english": ["stdlib:textwrap", "stdlib:html"], "max_len": 64, "batch": 4, "train_windows": 24,
              "val_windows": 4, "eval_tokens": 600, "min_steps": 4, "max_steps": 8, "check_every": 2, "lr": 1e-2,
              "rank": 4, "kinds_domains": 2, "n_list": [2], "router_steps": 4, "gate_steps": 3, "fit_windows": 8,
              "max_tokens": 512, "collab_windows": 8, "distill_steps": 8, "fit_steps": 20,
              "gsm8k": 0},
}
KIND_SPECS = {"lora": lambda p: {"rank": p["rank"], "alpha": 2 * p["rank"]}, "mlp": lambda p: {"hidden": 128},
              "ffn": lambda p: {}}
KIND_LR = {"lora": 1.0, "mlp": 1.0, "ffn": 0.15}  # times the profile's learning rate
# Every router kind that routes (uniform does not) at N = 2, 4, 8, as at N = 14; the data-built ones first.
SCALING_ROUTERS = ["centroid", "phatgoose", "rnd", "rnd_lowrank", "arrow", "learned", "top_p", "smear", "expert_choice",
                   "learned+null2"]
# The RND bet given its best chance: the low-rank router's options that cost nothing per token (longer fitting, a
# sharper softmax) and a wider projection that keeps it under 3x centroid's cost at N = 14.
RND_VARIANTS = {"rnd_lowrank:steps1600": {"steps": 1600}, "rnd_lowrank:t0.3": {"temperature": 0.3},
                "rnd_lowrank:r24": {"rank": 24}}


# ---------------------------------------------------------------- cached steps with progress

class Steps(Measured):
    """Measurements in <folder>/measured.json: each computed once, then read back; a progress line per step with
    an ETA from the mean time of the steps of its kind (the part of the key before the first '/')."""

    def __init__(self, path: Path, planned: list[str], kept: "Kept | None" = None):
        super().__init__(path)
        self.planned = planned
        self.kept = kept

    def mean_seconds(self, key: str) -> float:
        kind = key.split("/")[0]
        same = [v["seconds"] for k, v in self.data.items() if k.split("/")[0] == kind]
        every = [v["seconds"] for v in self.data.values()]
        return sum(same) / len(same) if same else (sum(every) / len(every) if every else 60.0)

    def eta(self) -> float:
        return sum(self.mean_seconds(k) for k in self.planned if k not in self.data)

    def has(self, key: str) -> bool:
        return key in self.data

    def try_get(self, key: str, compute: Callable[[], Any]) -> Any:
        """As `get`, but a failure is printed and left uncached (a rerun tries again); returns None then."""
        try:
            return self.get(key, compute)
        except Exception as err:  # one contender failing must not stop the study
            print(f"[{time.strftime('%H:%M:%S')}] {key} FAILED: {type(err).__name__}: {err}", flush=True)
            return None

    def report(self, key: str) -> None:
        if self.kept is not None:
            self.kept.save()
        done = sum(k in self.data for k in self.planned)
        print(f"[{time.strftime('%H:%M:%S')}] {done}/{len(self.planned)} {key}: {self.data[key]['seconds']} s; "
              f"ETA {self.eta() / 60:.0f} min", flush=True)


def to_retrain(steps: Steps, users: dict[str, list[str]], on_disk: set[str]) -> list[str]:
    """The measured expert steps to train again: those whose weights are not in the cache (too large to keep in the
    repository, say) while a step that loads them is still to be measured. An expert whose every user is measured
    stays measured, so a new machine does not retrain it for nothing."""
    return [k for k in steps.data if k.startswith("expert/") and k not in on_disk
            and any(u in steps.planned and not steps.has(u) for u in users.get(k, []))]


class Kept:
    """The small part of a cache kept in the repository (KEPT/<setting>), so that the study goes on where the last
    machine left it: measured.json, and the trained experts, per-token log-probs and training curves of under
    1 MB a file. Heavy caches (prefix states, checkpoints, activations, large experts) stay in the cache only.
    `restore()` copies what the cache lacks back into it; `save()` copies what changed out of it."""

    PATTERNS = ("measured.json", "experts/*/*", "tokens/*.safetensors", "training/*/curve.json")
    LIMIT = 1 << 20  # for every file but the measurements themselves (STEPS), which are always kept
    STEPS = "measured.json"

    def __init__(self, cache: Path, folder: Path):
        self.cache, self.folder = cache, folder

    def _files(self, root: Path) -> list[Path]:
        return [f for pattern in self.PATTERNS for f in sorted(root.glob(pattern)) if f.is_file()]

    def restore(self) -> int:
        copied = 0
        for f in self._files(self.folder):
            target = self.cache / f.relative_to(self.folder)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
                copied += 1
        return copied

    def save(self) -> None:
        for f in self._files(self.cache):
            target = self.folder / f.relative_to(self.cache)
            if f.stat().st_size > self.LIMIT and f.name != self.STEPS:
                continue
            if not target.exists() or target.read_bytes() != f.read_bytes():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)


# ---------------------------------------------------------------- data

def expert_name(domain: str) -> str:
    """The expert (and report) name of a data domain: man:pt_BR -> man-pt-br."""
    return domain.replace(":", "-").replace("_", "-").lower()


def check_data(names: list[str]) -> None:
    """Prepare every domain, or stop with the install command of what is missing."""
    for name in names:
        try:
            prepare(name)
        except ZooError as err:
            raise SystemExit(f"domain {name!r}: {err}") from None


def windows(docs: list[dict], tok, max_len: int, n: int | None = None, tokens: int | None = None) -> list[Example]:
    """Windows of evenly spaced documents: `n` windows, or the fewest giving at least `tokens` scored tokens."""
    k = max(1, (n or 4) // 2)
    while True:
        picked = [docs[i * len(docs) // k] for i in range(min(k, len(docs)))]
        ex = tokenize(picked, tok, max_len)
        enough = len(ex) >= n if n else scored(ex) >= tokens
        if enough or k >= len(docs):
            break
        k *= 2
    if n:
        return [ex[i * len(ex) // n] for i in range(n)] if len(ex) > n else ex
    out, count = [], 0
    for e in ex:
        if count >= tokens:
            break
        out.append(e)
        count += scored([e])
    return out


def scored(ex: list[Example]) -> int:
    return sum(sum(1 for t in e.labels[1:] if t != IGNORE) for e in ex)


def load_data(p: dict[str, Any], tok) -> tuple[dict, dict, dict, dict]:
    """train, validation, test windows per domain (test only for English) and the available token counts.
    Training documents are those at positions i % 10 != 9 of the train file, validation those at i % 10 == 9."""
    train, val, test, counts = {}, {}, {}, {}
    for name in p["domains"] + p["english"]:
        train_file, test_file = prepare(p["sources"][name])
        test_docs = read_documents(test_file)
        test[name] = windows(test_docs, tok, p["max_len"], tokens=p["eval_tokens"])
        chars_per_token = sum(len(tok.decode(e.input_ids)) for e in test[name]) / max(1, sum(len(e.input_ids) for e in test[name]))
        docs = read_documents(train_file)
        size = lambda ds: sum(len(d.get("text", "") + d.get("prompt", "") + d.get("completion", "")) for d in ds)  # noqa: E731
        counts[name] = {"train_tokens_est": int(size(docs) / chars_per_token),
                        "test_tokens_est": int(size(test_docs) / chars_per_token),
                        "train_documents": len(docs), "test_documents": len(test_docs)}
        if name in p["domains"]:
            train[name] = windows([d for i, d in enumerate(docs) if i % 10 != 9], tok, p["max_len"], n=p["train_windows"])
            val[name] = windows([d for i, d in enumerate(docs) if i % 10 == 9] or docs, tok, p["max_len"],
                                n=p["val_windows"])
        counts[name]["eval_tokens"] = scored(test[name])
    return train, val, test, counts


class Caches:
    """Prefix caches (the frozen layers below the first expert layer) of every example set, kept on disk."""

    def __init__(self, model, layers: list[int], pad: int, folder: Path):
        self.model, self.layers, self.pad, self.folder = model, layers, pad, folder
        self.mem: dict[int, PrefixCache | None] = {}

    def __call__(self, examples: list[Example], keep: bool = True) -> PrefixCache | None:
        key = id(examples)
        if key in self.mem:
            return self.mem[key]
        cache = prefix_cache(self.model, self.layers, examples, pad_id=self.pad, folder=self.folder, progress=False)
        if keep:
            self.mem[key] = cache
        return cache


def bound(cache: PrefixCache | None, zoo) -> PrefixCache | None:
    """The same cached states, run through `zoo`'s own model (every zoo of the study has its own copy of the base)."""
    if cache is None or cache.model is zoo.model:
        return cache
    out = copy.copy(cache)
    out.model = zoo.model
    return out


def union_cache(parts: list[tuple[list[Example], PrefixCache | None]]) -> PrefixCache | None:
    """One prefix cache of several example sets, from their own caches (no layer is run again)."""
    if parts[0][1] is None:
        return None
    first = parts[0][1]
    out = PrefixCache.__new__(PrefixCache)
    out.model, out.layer, out.pad_id = first.model, first.layer, first.pad_id
    out.index, out.hidden = {}, []
    for examples, cache in parts:
        for e in examples:
            out.index[id(e)] = len(out.hidden)
            out.hidden.append(cache.hidden[cache.index[id(e)]])
    return out


# ---------------------------------------------------------------- measuring

@torch.no_grad()
def measure(zoo, examples: list[Example], cache: PrefixCache | None, pad: int, batch: int = 8,
            tokens: bool = False) -> dict[str, Any]:
    """Per-window summed NLL and scored tokens, the mean NLL, the load (experts per token per site) and the share
    of token-sites sent to the base alone; with `tokens`, every scored token's log-prob too (for Co-LLM)."""
    zoo.eval()
    cache = bound(cache, zoo)
    sums, counts, lps = [], [], []
    base_alone = token_sites = slots = 0
    for i in range(0, len(examples), batch):
        part = examples[i:i + batch]
        b = cache.batch(part) if cache is not None else _collate(part, pad)
        with (cache.running() if cache is not None else _null()), zoo.trace() as trace:
            inputs = {k: b[k].to(zoo.device) for k in ("input_ids", "inputs_embeds") if k in b}
            logits = zoo(**inputs, attention_mask=b["attention_mask"].to(zoo.device)).logits.float().cpu()
        target = b["labels"][:, 1:]
        keep = target != IGNORE
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums += (-(lp * keep)).sum(1).tolist()
        counts += keep.sum(1).tolist()
        if tokens:
            lps.append(lp[keep])
        mask = b["attention_mask"].reshape(-1).bool()
        for rec in trace.records:
            idx = rec["indices"]
            if idx.shape[0] != mask.numel():
                continue
            idx = idx[mask]
            base_alone += int((idx < 0).all(-1).sum())
            slots += int((idx >= 0).sum())
            token_sites += idx.shape[0]
    out = {"nll": sum(sums) / max(1, sum(counts)), "window_nll": sums, "window_tokens": counts,
           "load": slots / max(1, token_sites), "base_alone": base_alone / max(1, token_sites)}
    if tokens:
        out["token_lp"] = torch.cat(lps)
    return out


def _collate(part, pad):
    from expertzoo.data import collate
    return collate(part, pad)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def public(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != "token_lp"}


# ---------------------------------------------------------------- training to a plateau

def plateau(curve: list[tuple[int, float]], min_steps: int) -> bool:
    """Held-out NLL flat within 1% over the last fifth of training (or still falling by less than that)."""
    if not curve or curve[-1][0] < min_steps:
        return False
    step, now = curve[-1]
    earlier = [v for s, v in curve if s <= 0.8 * step]
    return bool(earlier) and (earlier[-1] - now) / now < 0.01


def train_to_plateau(zoo, name: str, params, examples, cache, val, val_cache, p, folder: Path, *, lr: float,
                     steps: int | None = None, every: int | None = None, pad: int = 0) -> dict[str, Any]:
    """Train `params` (with `name` forced) in chunks of `every` (default check_every) steps until the held-out NLL
    plateaus or max_steps (or exactly `steps`); checkpoints and the curve are kept in `folder`, so a killed run
    resumes where it stopped."""
    cache, every = bound(cache, zoo), every or p["check_every"]
    folder.mkdir(parents=True, exist_ok=True)
    curve_file = folder / "curve.json"
    curve = [tuple(c) for c in json.loads(curve_file.read_text())] if curve_file.is_file() else []
    start = time.perf_counter()
    target = steps or p["max_steps"]
    done = curve[-1][0] if curve else 0
    run = lambda upto: train_params(zoo, params, examples, steps=upto, lr=lr, batch_size=p["batch"],  # noqa: E731
                                    checkpoint_dir=folder / "ckpt", checkpoint_every=every, resume=True,
                                    progress=False, prefix=cache, desc=name)
    with zoo.force_expert(name):
        if not curve:
            curve.append((0, measure(zoo, val, val_cache, pad)["nll"]))
        elif done:
            run(done)  # loads the last checkpoint (no step is run)
        while done < target and (steps or not plateau(curve, p["min_steps"])):
            done = min(target, done + every)
            run(done)
            curve.append((done, measure(zoo, val, val_cache, pad)["nll"]))
            atomic_write_text(curve_file, json.dumps(curve))
            print(f"    {name}: step {done}, held-out NLL {curve[-1][1]:.4f}", flush=True)
    return {"steps": done, "curve": curve, "plateau": plateau(curve, p["min_steps"]), "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- the study

class Study:
    def __init__(self, args):
        self.args = args
        self.p = dict(PROFILES["smoke" if args.smoke else "full"])
        if args.domains:
            self.p["domains"] = self.p["domains"][:args.domains]
        for key in ("max_steps", "eval_tokens", "train_windows"):
            if getattr(args, key, None):
                self.p[key] = getattr(args, key)
        if args.gsm8k is not None:
            self.p["gsm8k"] = args.gsm8k
        self.profile = "smoke" if args.smoke else "full"
        overrides = "".join(f"-{k}{getattr(args, a)}" for k, a in (("d", "domains"), ("s", "max_steps"),
                            ("t", "eval_tokens"), ("w", "train_windows")) if getattr(args, a))
        self.p["sources"] = {expert_name(n): n for n in self.p["domains"] + self.p["english"]}
        self.p["domains"] = [expert_name(n) for n in self.p["domains"]]
        self.p["english"] = [expert_name(n) for n in self.p["english"]]
        self.root = Path(args.cache or cache_dir() / "study") / (self.profile + overrides)  # own cache per setting
        self.experts_dir = self.root / "experts"

    # ------------------------------------------------------------ plan
    def plan(self) -> list[str]:
        p, d = self.p, self.p["domains"]
        keys = ["data"] + [f"expert/{n}/lora" for n in d]
        kd = d[:p["kinds_domains"]]
        keys += [f"expert/{n}/{k}" for n in kd for k in ("mlp", "ffn", "dit")]
        keys += ["expert/multitask", "eval/base"] + [f"eval/oracle/{n}" for n in d]
        keys += [f"eval/kind/{n}/{k}" for n in kd for k in ("mlp", "ffn", "dit")]
        keys += [f"router/{r}" for r in self.router_names()] + ["eval/merge/linear", "eval/merge/ties",
                                                               "eval/multitask"]
        keys += [f"collab/{n}" for n in d]
        keys += [f"scaling/{n}/{r}" for n in p["n_list"] if n < len(d) for r in SCALING_ROUTERS]
        if p["gsm8k"] and "math" in d:
            keys += ["gsm8k/base", "gsm8k/math", "gsm8k/zoo"]
        return keys

    @staticmethod
    def router_names() -> list[str]:
        names = [k for k in ROUTER_KINDS.names() if k != "fixed"]
        return names + ["learned+null2"] + list(RND_VARIANTS)

    def router_spec(self, name: str) -> dict[str, Any]:
        if name == "learned+null2":
            return {"kind": "learned", "top_k": 2, "null_experts": 2}
        if name in RND_VARIANTS:
            variant = dict(RND_VARIANTS[name])
            if "steps" in variant and self.p["fit_steps"]:  # a short profile: four times its own steps
                variant["steps"] = 4 * self.p["fit_steps"]
            return {**self.router_spec("rnd_lowrank"), **variant}
        spec: dict[str, Any] = {"kind": name, "top_k": 2}
        if name == "phatgoose":
            spec.update(steps=self.p["gate_steps"], lr=1e-2, batch_size=self.p["batch"])
        if name in ("rnd", "rnd_lowrank") and self.p["fit_steps"]:
            spec.update(steps=self.p["fit_steps"])
        if name == "uniform":
            spec = {"kind": "uniform"}
        return spec

    def expert_users(self) -> dict[str, list[str]]:
        """Per trained expert's step, the steps that load it from disk."""
        p, out = self.p, {"expert/multitask": ["eval/multitask"]}
        for n in p["domains"]:
            out[f"expert/{n}/lora"] = ([f"eval/oracle/{n}", "eval/merge/linear", "eval/merge/ties", f"collab/{n}",
                                        "gsm8k/math", "gsm8k/zoo"] + [f"router/{r}" for r in self.router_names()]
                                       + [f"scaling/{s}/{r}" for s in p["n_list"] for r in SCALING_ROUTERS])
            for k in ("mlp", "ffn", "dit"):
                out[f"expert/{n}/{k}"] = [f"eval/kind/{n}/{k}"]
        return out

    def experts_on_disk(self) -> set[str]:
        """The expert steps whose weights are in the cache."""
        out = {"expert/multitask"} if (self.experts_dir / "multitask" / "expert.safetensors").is_file() else set()
        return out | {f"expert/{n}/{k}" for n in self.p["domains"] for k in ("lora", "mlp", "ffn", "dit")
                      if (self.expert_folder(n, k) / "expert.safetensors").is_file()}

    # ------------------------------------------------------------ set-up
    def setup(self) -> None:
        p = self.p
        torch.set_num_threads(self.args.threads)
        torch.manual_seed(0)
        check_data(list(p["sources"].values()))
        kept = None
        if self.args.keep and not self.args.smoke:
            kept = Kept(self.root, Path(self.args.keep) / self.root.name)
            restored = kept.restore()
            if restored:
                print(f"restored {restored} files from {kept.folder} into the cache", flush=True)
        self.steps = Steps(self.root / "measured.json", self.plan(), kept)
        for key in to_retrain(self.steps, self.expert_users(), self.experts_on_disk()):
            del self.steps.data[key]
        print(f"study {self.profile}: {len(self.steps.planned)} steps, "
              f"{sum(self.steps.has(k) for k in self.steps.planned)} cached; cache {self.root}", flush=True)
        self.zoo = ez.build(self.config("lora", p["domains"])).eval()
        tok = self.zoo.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.train, self.val, self.test, counts = load_data(p, tok)
        self.fit = {n: self.train[n][:p["fit_windows"]] for n in p["domains"]}
        self.steps.get("data", lambda: counts)
        self.site_layers = sorted({l.site.layer for l in self.zoo.layers})
        self.caches = Caches(self.zoo.model, self.site_layers, self.pad, self.root / "prefix")

    def config(self, kind: str, names: list[str], router: dict[str, Any] | None = None, sources: bool = False,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
        experts = []
        for n in names:
            spec: dict[str, Any] = {"name": n, "kind": kind}
            if sources:
                spec["from"] = str(self.expert_folder(n, kind))
            else:
                spec.update(KIND_SPECS.get(kind, lambda p: {})(self.p))
            experts.append(spec)
        return {"base": self.p["base"], "sites": ["mlp"], "layers": self.p["layers"],
                "router": router or {"kind": "uniform"}, "experts": experts + ([extra] if extra else [])}

    def expert_folder(self, name: str, kind: str) -> Path:
        return self.experts_dir / f"{name}-{kind}"

    # ------------------------------------------------------------ experts
    def trained_expert(self, name: str, kind: str) -> dict[str, Any]:
        """Train (or read back) expert `name` of `kind` on its domain; saved in its own folder."""
        def compute() -> dict[str, Any]:
            p = self.p
            zoo = ez.build(self.config(kind, [name])) if kind in ("mlp", "ffn") else None
            if kind == "dit":
                return self.distilled(name)
            zoo = zoo or self.zoo
            cache = self.caches(self.train[name], keep=False)
            out = train_to_plateau(zoo, name, zoo.expert_parameters(name), self.train[name], cache, self.val[name],
                                   self.caches(self.val[name]), p, self.root / "training" / f"{name}-{kind}",
                                   lr=p["lr"] * KIND_LR[kind], pad=self.pad)
            zoo.save_expert(name, self.expert_folder(name, kind))
            layer = zoo.layers[0]
            out.update(parameters=sum(t.numel() for t in zoo.expert_parameters(name)),
                       flops_per_token=sum(int(l.experts[name].flops_per_token()) for l in zoo.layers),
                       sites=len(zoo.layers), kind=kind, d=layer.site.d_in)
            return out
        return self.steps.get(f"expert/{name}/{kind}", compute)

    def distilled(self, name: str) -> dict[str, Any]:
        """A DiT expert distilled from the domain's LoRA expert (its output deltas on the domain's data)."""
        teacher = ez.build(self.config("lora", [name], sources=True, extra={"name": "dit", "kind": "dit"})).eval()
        start = time.perf_counter()
        pairs = teacher_deltas(teacher, name, self.train[name][:self.p["fit_windows"]], max_tokens=self.p["max_tokens"])
        losses = distill_expert(teacher, "dit", pairs, steps=self.p["distill_steps"], lr=2e-3, progress=False)
        folder = self.expert_folder(name, "dit")
        teacher.save_expert("dit", folder)
        return {"steps": len(losses), "distill_loss": losses[-1], "seconds": time.perf_counter() - start, "kind": "dit",
                "parameters": sum(t.numel() for t in teacher.expert_parameters("dit")),
                "flops_per_token": sum(int(l.experts["dit"].flops_per_token()) for l in teacher.layers)}

    def all_experts(self) -> dict[str, Any]:
        out = {f"{n}/lora": self.trained_expert(n, "lora") for n in self.p["domains"]}
        for n in self.p["domains"][:self.p["kinds_domains"]]:
            for k in ("mlp", "ffn", "dit"):
                out[f"{n}/{k}"] = self.trained_expert(n, k)
        return out

    def multitask(self) -> dict[str, Any]:
        """One LoRA of the experts' total rank on the union of their data, for the experts' total steps."""
        def compute() -> dict[str, Any]:
            p, d = self.p, self.p["domains"]
            total = sum(self.steps.data[f"expert/{n}/lora"]["value"]["steps"] for n in d)
            rank = p["rank"] * len(d)
            zoo = ez.build({**self.config("lora", []), "experts": [{"name": "multitask", "kind": "lora", "rank": rank,
                                                                    "alpha": 2 * rank}]})
            train = [e for n in d for e in self.train[n]]
            val = [e for n in d for e in self.val[n]]
            cache = union_cache([(self.train[n], self.caches(self.train[n], keep=False)) for n in d])
            val_cache = union_cache([(self.val[n], self.caches(self.val[n])) for n in d])
            out = train_to_plateau(zoo, "multitask", zoo.expert_parameters("multitask"), train, cache, val, val_cache,
                                   p, self.root / "training" / "multitask", lr=p["lr"], steps=total,
                                   every=p["check_every"] * len(d), pad=self.pad)
            zoo.save_expert("multitask", self.experts_dir / "multitask")
            out.update(rank=rank, parameters=sum(t.numel() for t in zoo.expert_parameters("multitask")))
            return out
        return self.steps.get("expert/multitask", compute)

    # ------------------------------------------------------------ evaluation helpers
    def sets(self, domains: list[str] | None = None) -> list[str]:
        return (domains or self.p["domains"]) + self.p["english"]

    def evaluate_all(self, zoo, names: list[str], forced=None, tokens_into: dict | None = None) -> dict[str, Any]:
        out = {}
        for n in names:
            ex = self.test[n]
            if forced is not None:
                with zoo.force_expert(forced):
                    m = measure(zoo, ex, self.caches(ex), self.pad, tokens=tokens_into is not None)
            else:
                m = measure(zoo, ex, self.caches(ex), self.pad)
            if tokens_into is not None:
                tokens_into[n] = m["token_lp"]
            out[n] = public(m)
        return out

    def token_file(self, key: str) -> Path:
        return self.root / "tokens" / f"{key.replace('/', '_').replace(':', '-')}.safetensors"

    def with_tokens(self, key: str, compute: Callable[[dict], Any]) -> Any:
        """A step whose per-token log-probs are also kept (for Co-LLM); recomputed if the token file is lost."""
        path = self.token_file(key)
        if self.steps.has(key) and path.is_file():
            return self.steps.data[key]["value"]
        self.steps.data.pop(key, None)
        lps: dict[str, torch.Tensor] = {}
        value = self.steps.get(key, lambda: compute(lps))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in lps.items()}, path)
        return value

    def lora_zoo(self, names: list[str], router: dict[str, Any] | None = None):
        return ez.build(self.config("lora", names, router=router, sources=True)).eval()

    def activations(self, name: str) -> list[torch.Tensor]:
        """Router inputs at every site of the domain's fit windows with its expert forced (what fit_router's
        default collects), kept on disk: every activation-fitted router and every N reuses them."""
        path = self.root / "activations" / f"{name}.safetensors"
        if not path.is_file():
            zoo = self.lora_zoo([name])
            acts = collect_inputs(zoo, self.fit[name], expert=name, max_tokens=self.p["max_tokens"],
                                  batch_size=self.p["batch"])
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({str(i): a.contiguous() for i, a in enumerate(acts)}, path)
        stored = load_file(path)
        return [stored[str(i)] for i in range(len(stored))]

    def fitted(self, names: list[str], router_name: str):
        """A LoRA zoo of `names` with router `router_name` fitted or trained on their training data (from the
        prefix caches: no frozen layer below the experts is run again)."""
        spec = self.router_spec(router_name)
        zoo = self.lora_zoo(names, spec)
        start = time.perf_counter()
        pairs = router_sites(zoo)
        fit_from = ROUTER_KINDS.get(spec["kind"]).fit_from
        if fit_from == "activations":
            for n in names:
                for (router, _), a in zip(pairs, self.activations(n)):
                    router.fit(n, a.to(zoo.device))
        elif fit_from == "weights":
            for router, layer in pairs:
                for n in names:
                    router.fit_weights(n, layer.experts[n])
        elif fit_from == "gates":  # PHATGOOSE: gate vectors trained on the expert's own data, everything else frozen
            opts = pairs[0][0].options
            for n in names:
                gates = {layer.site.name: torch.zeros(layer.site.d_in, device=zoo.device, requires_grad=True)
                         for _, layer in pairs}
                with zoo.force_expert(n), gates_applied(zoo, gates):
                    train_params(zoo, list(gates.values()), self.fit[n], steps=opts.steps, lr=opts.lr,
                                 batch_size=opts.batch_size, seed=pairs[0][0].expert_seed(n), progress=False,
                                 prefix=bound(self.caches(self.fit[n]), zoo), desc=f"gates {n}")
                for router, layer in pairs:
                    router.set_gate(n, gates[layer.site.name])
        elif zoo.router_parameters():  # trained by gradient on the mixed training data of the experts
            mixed = [e for n in names for e in self.fit[n]]
            random.Random(0).shuffle(mixed)
            cache = union_cache([(self.fit[n], self.caches(self.fit[n])) for n in names])
            zoo.train()
            train_params(zoo, zoo.router_parameters(), mixed, steps=self.p["router_steps"], lr=1e-2,
                         batch_size=self.p["batch"], balance_weight=0.01, z_weight=0.001, progress=False,
                         balance_schedule=balance_anneal if spec.get("null_experts") else None, desc="router",
                         prefix=bound(cache, zoo))
            zoo.eval()
        fit_s = time.perf_counter() - start
        return zoo, {"fit_s": fit_s, "flops_per_token_per_site": int(pairs[0][0].flops_per_token()),
                     "sites": len(zoo.layers)}

    def merged(self, method: str) -> dict[str, Any]:
        zoo = self.lora_zoo(self.p["domains"])
        deltas = merged_deltas(zoo, method, self.args.ties_density)
        d_in = deltas[0].shape[1]
        merged = ez.build({**self.config("lora", []), "experts": [{"name": "merged", "kind": "lora", "rank": d_in,
                                                                  "alpha": d_in}]}).eval()
        with torch.no_grad():
            for layer, delta in zip(merged.layers, deltas):
                layer.experts["merged"].lora_A.copy_(torch.eye(d_in))
                layer.experts["merged"].lora_B.copy_(delta)
        return self.evaluate_all(merged, self.sets(), forced="merged")

    def collab(self, name: str) -> dict[str, Any]:
        """Co-LLM token deferral between the base and the zoo forced to `name`'s expert: a head on the base's last
        hidden state trained on the domain's training windows, eta chosen on its validation windows."""
        zoo = self.lora_zoo([name])
        fit = self.train[name][:self.p["collab_windows"]]

        def feats(ex: list[Example]) -> TokenFeatures:
            hidden, lp = [], {}
            for forced in ([], name):
                with zoo.force_expert(forced):
                    m = measure(zoo, ex, self.caches(ex, keep=False), self.pad, tokens=True)
                lp[bool(forced)] = m["token_lp"]
            hidden = last_hidden(zoo, ex, self.caches(ex, keep=False), self.pad)
            return TokenFeatures(hidden, lp[False], lp[True])

        start = time.perf_counter()
        head, _ = train_head(feats(fit), steps=300, weak_steps=100)
        val = feats(self.val[name])
        with torch.no_grad():
            eta = choose_eta(torch.sigmoid(head(val.hidden)), val, None)
        fit_s = time.perf_counter() - start
        out = {"eta": eta, "fit_s": fit_s, "sets": {}}
        base_lp = load_file(self.token_file("eval/base"))
        own_lp = load_file(self.token_file(f"eval/oracle/{name}"))
        for n in [name] + self.p["english"]:
            h = last_hidden(zoo, self.test[n], self.caches(self.test[n]), self.pad)
            with torch.no_grad():
                defer = torch.sigmoid(head(h)) > eta
            lp = torch.where(defer, own_lp[n], base_lp[n])
            counts = self.steps.data["eval/base"]["value"][n]["window_tokens"]
            sums, i = [], 0
            for c in counts:
                sums.append(float(-lp[i:i + c].sum()))
                i += c
            out["sets"][n] = {"nll": sum(sums) / max(1, sum(counts)), "window_nll": sums, "window_tokens": counts,
                              "deferral_rate": float(defer.float().mean()), "base_alone": float(1 - defer.float().mean())}
        return out

    def gsm8k(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Exact match on the GSM8K evaluation half (lm-eval task gsm8k_zoo, greedy, zero-shot) of the base, the
        math expert forced, and the zoo with the router of best worst-domain gain recovery."""
        s = study_report.summary(raw)
        best = max(study_report.routed(s, raw), key=study_report.Measures(s).worst)
        out = {}
        for key, router, options in (("base", None, {"base_only": True}), ("math", None, {"force": "math"}),
                                     ("zoo", best, {})):
            def compute(router=router, options=options):
                folder = self.root / "gsm8k-zoos" / (router or "lora")
                if not (folder / "zoo.json").is_file():
                    zoo = self.fitted(self.p["domains"], router)[0] if router else self.lora_zoo(self.p["domains"])
                    zoo.save(folder)
                return run_gsm8k(folder, options, self.p["gsm8k"]) | {"router": router}
            out[key] = self.steps.get(f"gsm8k/{key}", compute)
        return out

    # ------------------------------------------------------------ checks before the long run
    def check(self, windows_per_domain: int = 16) -> dict[str, Any]:
        """Are the domains distinct, and how long will the run take? Base NLL per domain and the sequence-level
        routing accuracy of a centroid router fitted on base activations (untrained experts), on held-out windows;
        the seconds of one expert training step and of evaluating one window, from the prefix cache."""
        if (self.root / "check.json").is_file():  # cached like every step
            out = json.loads((self.root / "check.json").read_text(encoding="utf-8"))
            write_check(out, self.p, Path(self.args.out), self.profile)
            return out
        self.setup()
        p, d, k = self.p, self.p["domains"], windows_per_domain
        from expertzoo.evaluation.evaluate import evaluate
        zoo = ez.build(self.config("lora", d, router={"kind": "centroid", "top_k": 1})).eval()
        for n in d:
            for (router, _), a in zip(router_sites(zoo), collect_inputs(zoo, self.fit[n][:k], expert=None,
                                                                        max_tokens=p["max_tokens"])):
                router.fit(n, a)
        out: dict[str, Any] = {"base_nll": {}, "routing_accuracy": {}, "confusion": {}}
        for n in d + p["english"]:
            ex = self.test[n][:k]
            r = evaluate(zoo, ex, pad_id=self.pad, progress=False, label=n if n in d else None)
            with zoo.force_expert([]):
                out["base_nll"][n] = measure(zoo, ex, None, self.pad)["nll"]
            out["routing_accuracy"][n] = r.get("routing_accuracy")
            out["confusion"][n] = {e: round(w, 3) for e, w in r["expert_weight"].items() if w >= 0.05}
        name = d[0]
        cache = self.caches(self.train[name][:4 * p["batch"]], keep=False)
        start = time.perf_counter()
        with self.zoo.force_expert(name):
            train_params(self.zoo, self.zoo.expert_parameters(name), self.train[name][:4 * p["batch"]], steps=4,
                         lr=p["lr"], batch_size=p["batch"], progress=False, prefix=bound(cache, self.zoo))
        out["train_step_s"] = (time.perf_counter() - start) / 4
        ex = self.test[name][:16]
        start = time.perf_counter()
        measure(self.zoo, ex, self.caches(ex), self.pad)
        out["eval_window_s"] = (time.perf_counter() - start) / len(ex)
        start = time.perf_counter()
        prefix_cache(self.zoo.model, self.site_layers, self.test[d[1]][:16], pad_id=self.pad, progress=False)
        out["prefix_window_s"] = (time.perf_counter() - start) / 16
        out["data"] = self.steps.data["data"]["value"]
        out["windows_per_domain"], out["load_average"] = k, os.getloadavg()[0]
        atomic_write_text(self.root / "check.json", json.dumps(out, indent=1) + "\n")
        write_check(out, p, Path(self.args.out), self.profile)
        for n in d + p["english"]:
            print(f"{n:18s} base NLL {out['base_nll'][n]:.3f}  centroid accuracy "
                  f"{'' if out['routing_accuracy'][n] is None else format(out['routing_accuracy'][n], '.0%'):>5s}  "
                  f"weights {out['confusion'][n]}", flush=True)
        print(f"train step {out['train_step_s']:.2f} s, evaluating a window {out['eval_window_s']:.3f} s, prefix of a "
              f"window {out['prefix_window_s']:.3f} s", flush=True)
        return out

    # ------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        self.setup()
        p, d = self.p, self.p["domains"]
        experts = self.all_experts()
        multitask = self.multitask()
        raw: dict[str, Any] = {"data": self.steps.data["data"]["value"], "experts": experts, "multitask": multitask}
        base_zoo = self.lora_zoo(d)
        raw["base"] = self.with_tokens("eval/base", lambda lps: self.evaluate_all(base_zoo, self.sets(), forced=[],
                                                                                  tokens_into=lps))
        raw["oracle"] = {n: self.with_tokens(f"eval/oracle/{n}", lambda lps, n=n: self.evaluate_all(
            base_zoo, [n] + p["english"], forced=n, tokens_into=lps)) for n in d}
        raw["kinds"] = {}
        for n in d[:p["kinds_domains"]]:
            for k in ("mlp", "ffn", "dit"):
                def kind_eval(n=n, k=k):
                    if k == "dit":
                        z = ez.build(self.config("lora", [n], sources=True,
                                                 extra={"name": "dit", "kind": "dit", "from": str(self.expert_folder(n, "dit"))}))
                        return self.evaluate_all(z.eval(), [n] + p["english"], forced="dit")
                    return self.evaluate_all(ez.build(self.config(k, [n], sources=True)).eval(), [n] + p["english"], forced=n)
                raw["kinds"][f"{n}/{k}"] = self.steps.get(f"eval/kind/{n}/{k}", kind_eval)
        raw["routers"] = {}
        for r in self.router_names():
            def router_eval(r=r):
                zoo, info = self.fitted(d, r)
                return {**info, "sets": self.evaluate_all(zoo, self.sets())}
            raw["routers"][r] = self.steps.try_get(f"router/{r}", router_eval)
        raw["merges"] = {m: self.steps.get(f"eval/merge/{m}", lambda m=m: self.merged(m)) for m in ("linear", "ties")}

        def multitask_eval():
            z = ez.build({**self.config("lora", []), "experts": [{"name": "multitask", "kind": "lora",
                                                                "from": str(self.experts_dir / "multitask")}]})
            return self.evaluate_all(z.eval(), self.sets(), forced="multitask")
        raw["multitask_eval"] = self.steps.get("eval/multitask", multitask_eval)
        raw["collab"] = {n: self.steps.try_get(f"collab/{n}", lambda n=n: self.collab(n)) for n in d}
        raw["scaling"] = {}
        for size in [s for s in p["n_list"] if s < len(d)]:
            for r in SCALING_ROUTERS:
                def scaling_eval(size=size, r=r):
                    zoo, info = self.fitted(d[:size], r)
                    return {**info, "sets": self.evaluate_all(zoo, self.sets(d[:size]))}
                raw["scaling"][f"{size}/{r}"] = self.steps.try_get(f"scaling/{size}/{r}", scaling_eval)
        for r in SCALING_ROUTERS:
            raw["scaling"][f"{len(d)}/{r}"] = raw["routers"][r]
        raw["lora_flops_per_token_per_site"] = experts[f"{d[0]}/lora"]["flops_per_token"] // experts[f"{d[0]}/lora"]["sites"]
        if p["gsm8k"] and "math" in d:
            raw["gsm8k"] = self.gsm8k(raw)
        return raw


@torch.no_grad()
def last_hidden(zoo, examples: list[Example], cache: PrefixCache | None, pad: int) -> torch.Tensor:
    """The base's last hidden state at every scored position (where it predicts the next token): [n, d]."""
    out, cache = [], bound(cache, zoo)
    with zoo.force_expert([]):
        for i in range(0, len(examples), 8):
            part = examples[i:i + 8]
            b = cache.batch(part) if cache is not None else _collate(part, pad)
            with cache.running() if cache is not None else _null():
                inputs = {k: b[k].to(zoo.device) for k in ("input_ids", "inputs_embeds") if k in b}
                h = zoo(**inputs, attention_mask=b["attention_mask"].to(zoo.device), output_hidden_states=True).hidden_states[-1]
            keep = b["labels"][:, 1:] != IGNORE
            out.append(h[:, :-1].float().cpu()[keep])
    return torch.cat(out)


def write_check(out: dict[str, Any], p: dict[str, Any], folder: Path, profile: str) -> None:
    """zoo-study-check.{md,json}: the domains, their token counts, base NLL and centroid routing accuracy."""
    stem = "zoo-study-check" if profile == "full" else "zoo-study-check-smoke"
    d, e = p["domains"], p["english"]
    lines = [f"# The zoo study's domains: are they distinct? ({p['base']}, layers {p['layers']})", "",
             "`python experiments/zoo_study.py --check`. Token counts of the train and held-out files are estimated "
             "from characters per token on the evaluation windows; base NLL and routing accuracy on "
             f"{out.get('windows_per_domain', 16)} held-out windows of {p['max_len']} tokens per domain. The centroid "
             "router (top-1) is fitted on base activations at the expert layers (untrained experts, so it measures "
             "whether the base's hidden states tell the domains apart); accuracy is sequence-level.", "",
             "| domain | source | train tokens (est.) | held-out tokens (est.) | base NLL | centroid accuracy | "
             "routing weight (>= 5%) |", "|---|---|---|---|---|---|---|"]
    for n in d + e:
        c, acc = out["data"][n], out["routing_accuracy"][n]
        lines.append(f"| {n}{' (general English)' if n in e else ''} | `{p['sources'][n]}` | "
                     f"{c['train_tokens_est']:,} | {c['test_tokens_est']:,} | {out['base_nll'][n]:.3f} | "
                     f"{'' if acc is None else format(acc, '.0%')} | "
                     + ", ".join(f"{k} {v:.0%}" for k, v in sorted(out["confusion"][n].items(), key=lambda kv: -kv[1]))
                     + " |")
    lines += ["", f"One expert training step ({p['batch']} x {p['max_len']} tokens, from the prefix cache): "
              f"{out['train_step_s']:.2f} s; evaluating one window, its prefix computed first: {out['eval_window_s']:.3f} s; "
              f"computing one window's prefix alone: {out['prefix_window_s']:.3f} s (" + (f"1-minute load average {out['load_average']:.1f} at the end"
                                                              if "load_average" in out else "machine shared with other "
                                                              "jobs during the check") + ").", ""]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{stem}.md", "\n".join(lines))
    atomic_write_text(folder / f"{stem}.json", json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {folder / stem}.md and .json")


def run_gsm8k(folder: Path, options: dict[str, Any], limit: int) -> dict[str, Any]:
    """lm-eval's gsm8k_zoo on the saved zoo `folder` for the first `limit` problems: exact match (both filters)."""
    import lm_eval

    import expertzoo.lmeval as zoo_lmeval

    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = lm_eval.simple_evaluate(model="zoo", model_args={"path": str(folder), "device": device, "batch_size": 16,
                                                           **options},
                                  tasks=["gsm8k_zoo"], limit=limit, task_manager=zoo_lmeval.task_manager(defaults=False),
                                  log_samples=False)
    r = res["results"]["gsm8k_zoo"]
    return {"problems": limit, **{k.replace(",", "/"): v for k, v in r.items() if k.startswith("exact_match")}}


def machine(threads: int) -> dict[str, Any]:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": threads,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, three domains, few steps (minutes)")
    ap.add_argument("--report-only", action="store_true", help="write the report from the cached measurements")
    ap.add_argument("--check", action="store_true", help="only check the domains are distinct and time one step")
    ap.add_argument("--domains", type=int, default=0, help="use only the first N domains of the profile")
    ap.add_argument("--max-steps", type=int, default=0, help="cap on expert training steps (default: the profile's)")
    ap.add_argument("--eval-tokens", type=int, default=0, help="scored held-out tokens per set (default: the profile's)")
    ap.add_argument("--train-windows", type=int, default=0)
    ap.add_argument("--gsm8k", type=int, default=None, help="GSM8K problems for lm-eval (default: the profile's; "
                    "0 skips GSM8K)")
    ap.add_argument("--ties-density", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="", help="cache folder (default ~/.cache/expertzoo/study)")
    ap.add_argument("--out", default=str(RESULTS), help="folder of zoo-study.{md,json} and its plots")
    ap.add_argument("--keep", default=str(KEPT), help="where the cache's small files are kept in the repository "
                    "(measured steps, experts under 1 MB), so another machine goes on from them; '' for nowhere")
    args = ap.parse_args(argv)
    study = Study(args)
    state = study.root / "report-state.json"
    out = Path(args.out)
    if args.report_only:
        if not state.is_file():
            raise SystemExit(f"nothing cached yet at {study.root}: run `python experiments/zoo_study.py"
                             f"{' --smoke' if args.smoke else ''}` first (it caches every step there)")
        doc = json.loads(state.read_text(encoding="utf-8"))
        study_report.write(doc["raw"], doc["settings"], out, profile=study.profile)
        return
    if args.check:
        study.check()
        return
    start = time.perf_counter()
    raw = study.run()
    settings = {**study.p, "threads": args.threads, "ties_density": args.ties_density, "profile": study.profile,
                "machine": machine(args.threads), "wall_s": time.perf_counter() - start,
                "command": "python experiments/zoo_study.py" + (" --smoke" if args.smoke else ""),
                "step_seconds": {k: v["seconds"] for k, v in study.steps.data.items()}}
    atomic_write_text(state, json.dumps({"raw": raw, "settings": settings}) + "\n")
    study_report.write(raw, settings, out, profile=study.profile)


if __name__ == "__main__":
    main()
