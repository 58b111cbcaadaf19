"""Co-LLM token deferral between two whole models (Shen et al. 2024): a head on the base's last hidden state gives
s = P(defer); the assistant writes token t when s > eta. Trained on frozen models' per-token log-probabilities:
weak supervision first (defer where the assistant predicts the token better), then the marginal likelihood
-log[(1-s) p_base + s p_asst]; eta is chosen on validation data. A collab folder: collab.json + head.safetensors."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..io.atomic import atomic_dir
from ..io.base_models import load_base
from ..nn.compat import cache_keyword, output_cache
from ..data import IGNORE, Example, batches, pad_id
from ..errors import ZooError
from ..build.load import load
from ..io.zoo_folder import CONFIG_FILE

COLLAB_FILE, HEAD_FILE = "collab.json", "head.safetensors"
FORMAT_VERSION = 1


def is_collab_folder(path: str | Path) -> bool:
    return (Path(path) / COLLAB_FILE).is_file()


def load_side(spec: str) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, spec to record) of a base spec or a zoo folder; folders are recorded by absolute path."""
    if (Path(spec) / CONFIG_FILE).is_file():
        zoo = load(spec)
        return zoo, zoo.tokenizer, str(Path(spec).resolve())
    model, tok = load_base(spec)
    return model, tok, str(Path(spec).resolve()) if Path(spec).exists() else spec


def check_vocab(base_tok: Any, asst_tok: Any) -> None:
    """Co-LLM needs one tokenizer: the same token -> id map on both sides."""
    a, b = base_tok.get_vocab(), asst_tok.get_vocab()
    if a == b:
        return
    if len(a) != len(b):
        detail = f"{len(a)} vs {len(b)} tokens"
    else:
        token = next(t for t in sorted(a) if b.get(t) != a[t])
        detail = f"token {token!r} has id {a[token]} vs {b.get(token)}"
    raise ZooError(f"base and assistant tokenizers differ ({detail}); Co-LLM defers token by token, so both models "
                   "must share one tokenizer: pick an assistant of the base's family")


@dataclass
class TokenFeatures:
    """Per scored token: the base's last hidden state where it predicts the token, and both models' log-probs."""

    hidden: torch.Tensor  # [N,d] float32
    lp_base: torch.Tensor  # [N]
    lp_asst: torch.Tensor  # [N]


def _token_logprobs(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log p(target) at the kept positions.  logits [B,S-1,V], target/keep [B,S-1] -> [n]"""
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp[keep]


@torch.no_grad()
def token_features(base: nn.Module, assistant: nn.Module, examples: list[Example], *, pad_id: int,
                   batch_size: int = 8) -> TokenFeatures:
    """Features of every scored token of `examples` (both models frozen, eval mode)."""
    hidden, lp_b, lp_a = [], [], []
    for model in (base, assistant):
        model.eval()
    for batch in batches(examples, batch_size, pad_id):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        target = batch["labels"][:, 1:]  # [B,S-1]
        keep = target != IGNORE
        out_b = base(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out_a = assistant(input_ids=ids, attention_mask=mask)
        hidden.append(out_b.hidden_states[-1][:, :-1][keep].float())
        lp_b.append(_token_logprobs(out_b.logits[:, :-1], target, keep))
        lp_a.append(_token_logprobs(out_a.logits[:, :-1], target, keep))
    if not hidden:
        raise ZooError("no examples to compute deferral features on; the data file is empty")
    return TokenFeatures(torch.cat(hidden), torch.cat(lp_b), torch.cat(lp_a))


class DeferralHead(nn.Module):
    """s = sigmoid(w . standardise(h) + b): the probability of deferring the next token to the assistant."""

    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: [N,d] -> logits [N]
        return self.linear((h.float() - self.mean) / self.std).squeeze(-1)


def mixture_nll(logit: torch.Tensor, lp_b: torch.Tensor, lp_a: torch.Tensor) -> torch.Tensor:
    """-log[(1-s) p_base + s p_asst] per token, with s = sigmoid(logit), in log space.  all [N] -> [N]"""
    return -torch.logaddexp(F.logsigmoid(-logit) + lp_b, F.logsigmoid(logit) + lp_a)


def train_head(feats: TokenFeatures, *, steps: int = 300, weak_steps: int = 100, lr: float = 1e-2,
               batch_tokens: int = 4096, seed: int = 0) -> tuple[DeferralHead, dict[str, list[float]]]:
    """Weak supervision (BCE on 'the assistant predicts the token better') for `weak_steps`, then the marginal
    likelihood for the remaining steps; Adam on minibatches of tokens."""
    head = DeferralHead(feats.hidden.shape[1])
    head.mean.copy_(feats.hidden.mean(0))
    head.std.copy_(feats.hidden.std(0).clamp(min=1e-4))
    optim = torch.optim.Adam(head.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    label = (feats.lp_asst > feats.lp_base).float()  # [N]
    losses: dict[str, list[float]] = {"weak": [], "marginal": []}
    for step in range(steps):
        idx = torch.randint(0, len(label), (min(batch_tokens, len(label)),), generator=g)
        logit = head(feats.hidden[idx])
        if step < weak_steps:
            loss, key = F.binary_cross_entropy_with_logits(logit, label[idx]), "weak"
        else:
            loss, key = mixture_nll(logit, feats.lp_base[idx], feats.lp_asst[idx]).mean(), "marginal"
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        losses[key].append(float(loss.detach()))
    return head.eval(), losses


def deferral_report(s: torch.Tensor, feats: TokenFeatures, eta: float) -> dict[str, float]:
    """Hard deferral at eta (the assistant's log-prob where s > eta) and the soft mixture, per token means."""
    defer = s > eta
    chosen = torch.where(defer, feats.lp_asst, feats.lp_base)
    nll = float(-chosen.mean())
    logit = torch.logit(s.double().clamp(1e-12, 1 - 1e-12)).float()
    return {"tokens": len(s), "nll": nll, "ppl": math.exp(min(nll, 50.0)),
            "nll_marginal": float(mixture_nll(logit, feats.lp_base, feats.lp_asst).mean()),
            "nll_base": float(-feats.lp_base.mean()), "nll_assistant": float(-feats.lp_asst.mean()),
            "deferral_rate": float(defer.float().mean())}


def choose_eta(s: torch.Tensor, feats: TokenFeatures, target_rate: float | None) -> float:
    """eta giving `target_rate` of deferred tokens (a quantile of s), or, without a target, the eta of lowest
    hard-deferral NLL among the 0%, 5%, ..., 100% deferral quantiles."""
    if target_rate is not None:
        if not 0.0 <= target_rate <= 1.0:
            raise ZooError(f"--target-rate {target_rate} is not a fraction; give a value in [0, 1], e.g. 0.2")
        return _eta_for_rate(s, target_rate)
    candidates = [_eta_for_rate(s, r / 20) for r in range(21)]
    return min(candidates, key=lambda eta: deferral_report(s, feats, eta)["nll"])


def _eta_for_rate(s: torch.Tensor, rate: float) -> float:
    """The threshold with round(rate * N) values of s above it: midway between neighbours of the sorted s."""
    ordered = s.double().sort(descending=True).values
    k = round(rate * len(ordered))
    if k <= 0:
        return float(ordered[0]) + 1e-6 if len(ordered) else 1.0
    if k >= len(ordered):
        return float(ordered[-1]) - 1e-6
    return float((ordered[k - 1] + ordered[k]) / 2)


class Collab:
    """Two models and a deferral head: `evaluate` (NLL of the deferral mixture) and greedy `generate`."""

    def __init__(self, base: nn.Module, assistant: nn.Module, tokenizer: Any, head: DeferralHead, eta: float,
                 meta: dict[str, Any]):
        self.base, self.assistant, self.tokenizer, self.head, self.eta, self.meta = base, assistant, tokenizer, head, eta, meta

    @torch.no_grad()
    def defer_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(hidden))  # [N]

    @torch.no_grad()
    def evaluate(self, examples: list[Example], *, pad_id: int, batch_size: int = 8) -> dict[str, float]:
        feats = token_features(self.base, self.assistant, examples, pad_id=pad_id, batch_size=batch_size)
        return deferral_report(self.defer_prob(feats.hidden), feats, self.eta)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, *, max_new_tokens: int, eos_id: int | None = None) -> tuple[list[int], list[bool]]:
        """Greedy decoding of one prompt ids [1,S]: each new token from the assistant when s > eta, else from the
        base. Each model keeps its own KV cache; the assistant runs only when a token is deferred to it, first
        catching up on the tokens it has not seen in one forward."""
        key_b, key_a = cache_keyword(self.base), cache_keyword(self.assistant)
        out_b = self.base(input_ids=ids, use_cache=True, output_hidden_states=True)
        cache_b, cache_a, pending = output_cache(out_b), None, ids[0].tolist()
        new, deferred = [], []
        for _ in range(max_new_tokens):
            defer = bool(self.defer_prob(out_b.hidden_states[-1][0, -1:])[0] > self.eta)
            if defer:
                out_a = self.assistant(input_ids=torch.tensor([pending], device=ids.device), use_cache=True,
                                       **{key_a: cache_a})
                cache_a, pending = output_cache(out_a), []
                token = int(out_a.logits[0, -1].argmax())
            else:
                token = int(out_b.logits[0, -1].argmax())
            new.append(token)
            deferred.append(defer)
            pending.append(token)
            if token == eos_id:
                break
            out_b = self.base(input_ids=torch.tensor([[token]], device=ids.device), use_cache=True,
                              output_hidden_states=True, **{key_b: cache_b})
            cache_b = output_cache(out_b)
        return new, deferred

    def save(self, directory: str | Path) -> Path:
        """collab.json (specs, eta, validation report) + head.safetensors, written atomically."""
        directory = Path(directory)
        if directory.exists() and not is_collab_folder(directory) and (not directory.is_dir() or any(directory.iterdir())):
            raise ZooError(f"{str(directory)!r} exists and is not a collab folder; choose an empty or new output folder")
        with atomic_dir(directory) as tmp:
            meta = {**self.meta, "eta": self.eta, "format_version": FORMAT_VERSION}
            (tmp / COLLAB_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, tmp / HEAD_FILE)
        return directory


def load_collab(directory: str | Path) -> Collab:
    """A collab folder: both models from their recorded specs, the head, eta."""
    path = Path(directory) / COLLAB_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        state = load_file(Path(directory) / HEAD_FILE)
    except (OSError, ValueError) as err:
        raise ZooError(f"{str(directory)!r} is not a readable collab folder ({str(err).splitlines()[0]}); "
                       "make it again with `zoo collab`") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ZooError(f"{str(path)!r} has format_version {meta.get('format_version')!r}, this expertzoo reads "
                       f"{FORMAT_VERSION}; make it again with `zoo collab`")
    base, tok, _ = load_side(meta["base"])
    assistant, asst_tok, _ = load_side(meta["assistant"])
    check_vocab(tok, asst_tok)
    head = DeferralHead(state["linear.weight"].shape[1])
    head.load_state_dict(state)
    return Collab(base, assistant, tok, head.eval(), float(meta["eta"]), meta)


def train_collab(base_side: tuple[nn.Module, Any, str], assistant_side: tuple[nn.Module, Any, str],
                 train: list[Example], valid: list[Example], *, steps: int = 300, weak_steps: int = 100,
                 lr: float = 1e-2, target_rate: float | None = None, batch_size: int = 8, seed: int = 0) -> Collab:
    """Train the head on `train` and choose eta on `valid`, for two sides from `load_side`; the result's meta holds
    the validation report."""
    (base, tok, base_rec), (assistant, asst_tok, asst_rec) = base_side, assistant_side
    check_vocab(tok, asst_tok)
    pad = pad_id(tok)
    feats = token_features(base, assistant, train, pad_id=pad, batch_size=batch_size)
    head, losses = train_head(feats, steps=steps, weak_steps=min(weak_steps, steps), lr=lr, seed=seed)
    val = token_features(base, assistant, valid, pad_id=pad, batch_size=batch_size)
    s = torch.sigmoid(head(val.hidden)).detach()
    eta = choose_eta(s, val, target_rate)
    meta = {"base": base_rec, "assistant": asst_rec, "target_rate": target_rate, "train_tokens": len(feats.lp_base),
            "validation": deferral_report(s, val, eta), "steps": steps, "weak_steps": min(weak_steps, steps),
            "loss": {k: (v[0], v[-1]) if v else None for k, v in losses.items()}}
    return Collab(base, assistant, tok, head, eta, meta)
