"""RND router (random network distillation as a familiarity test): one frozen random target network T per site
and, per expert, a predictor P_i trained to match T on that expert's own router inputs. Novelty
n_i(x) = ||P_i(x) - T(x)||^2, calibrated as a z-score of log n_i against expert i's held-out novelty; the least
novel experts win (top-k softmax of -z / temperature); a token unfamiliar to every expert goes to the base."""
from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..nn.routing import Routing, base_alone
from .base import ROUTERS
from .fitted import FittedRouter

EPS = 1e-8
MIN_STD = 0.05  # floor of the held-out log-novelty std: a few held-out inputs must not make z explode


class RndOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    target_hidden: int = Field(128, ge=1, description="hidden width of the random target network T")
    predictor_hidden: int = Field(64, ge=1, description="hidden width of each predictor P_i")
    out_dim: int = Field(32, ge=1, description="output width of T and P_i")
    steps: int = Field(300, ge=1, description="Adam steps to fit one predictor")
    lr: float = Field(3e-3, gt=0.0)
    batch_size: int = Field(256, ge=1)
    held_out: float = Field(0.1, gt=0.0, lt=1.0, description="share of the expert's inputs kept for calibration")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature over -z")
    threshold: float = Field(4.0, description="z above which an expert finds a token unfamiliar")
    seed: int = 0


def rms_normalise(x: torch.Tensor) -> torch.Tensor:
    """x / rms(x) per token: T and P see inputs of one scale at every site.  [..., d] -> [..., d]."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


def predict_one(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """One predictor: x [N,d], w1 [ph,d], b1 [ph], w2 [out,ph], b2 [out] -> [N,out]."""
    return torch.relu(x @ w1.T + b1) @ w2.T + b2


@ROUTERS.register("rnd")
class RndRouter(FittedRouter):
    Options = RndOptions
    fit_from = "activations"
    fit_pool = "mean"

    def __init__(self, **kw):
        super().__init__(**kw)
        o = self.options
        d, th, ph, out = self.d_in, o.target_hidden, o.predictor_hidden, o.out_dim
        g = torch.Generator().manual_seed(o.seed)
        self.register_buffer("target_w1", torch.randn(th, d, generator=g) / math.sqrt(d))  # [th, d]
        self.register_buffer("target_b1", torch.randn(th, generator=g) * 0.1)  # [th]
        self.register_buffer("target_w2", torch.randn(out, th, generator=g) / math.sqrt(th))  # [out, th]
        for name, shape in (("pred_w1", (ph, d)), ("pred_b1", (ph,)), ("pred_w2", (out, ph)), ("pred_b2", (out,)),
                            ("calib_mean", ()), ("calib_std", ())):
            self.per_expert(name, shape)

    # ------------------------------------------------------------------ networks
    def target(self, x: torch.Tensor) -> torch.Tensor:
        """T: [N, d] (normalised) -> [N, out]."""
        return torch.relu(x @ self.target_w1.T + self.target_b1) @ self.target_w2.T

    @staticmethod
    def predict(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        """Every predictor at once: x [N,d], w1 [E,ph,d], b1 [E,ph], w2 [E,out,ph], b2 [E,out] -> [N,E,out]."""
        hidden = torch.relu(torch.einsum("nd,ehd->neh", x, w1) + b1)  # [N,E,ph]
        return torch.einsum("neh,eoh->neo", hidden, w2) + b2  # [N,E,out]

    def log_novelty(self, h: torch.Tensor) -> torch.Tensor:
        """log ||P_i(x) - T(x)||^2 for every expert: h [T,d] -> [T,E]."""
        x = rms_normalise(h.float())
        pred = self.predict(x, self.pred_w1, self.pred_b1, self.pred_w2, self.pred_b2)  # [T,E,out]
        return (pred - self.target(x).unsqueeze(1)).pow(2).sum(-1).add(EPS).log()

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Negative calibrated novelty -z: h [T,d] -> [T,E] (0 = as familiar as the expert's own held-out data)."""
        return -(self.log_novelty(h) - self.calib_mean) / self.calib_std.clamp(min=MIN_STD)

    def finish(self, routing: Routing, scores: torch.Tensor) -> Routing:
        unfamiliar = scores.max(-1).values < -self.options.threshold  # [T]: every usable expert has z > threshold
        return base_alone(routing, unfamiliar)

    # ------------------------------------------------------------------ fitting
    def fit(self, expert_name: str, activations: torch.Tensor) -> None:
        """Train P_i on `activations` [N,d] (expert i's router inputs) and calibrate on a held-out share of them."""
        o = self.options
        g = torch.Generator().manual_seed(self.expert_seed(expert_name, o.seed))
        x = rms_normalise(activations.float().to(self.target_w1.device))
        order = torch.randperm(x.shape[0], generator=g).to(x.device)
        n_held = max(1, int(round(x.shape[0] * o.held_out))) if x.shape[0] > 1 else 0
        train, held = x[order[n_held:]], x[order[:n_held]] if n_held else x
        params = self._new_predictor(g)
        with torch.no_grad():
            target = self.target(x)  # [N,out]
        t_train, t_held = target[order[n_held:]], target[order[:n_held]] if n_held else target
        optim = torch.optim.Adam(params, lr=o.lr)
        with torch.enable_grad():
            for _ in range(o.steps):
                pick = torch.randint(0, train.shape[0], (min(o.batch_size, train.shape[0]),), generator=g).to(x.device)
                pred = predict_one(train[pick], *params)  # [b,out]
                loss = (pred - t_train[pick]).pow(2).sum(-1).mean()
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
        with torch.no_grad():
            pred = predict_one(held, *params)  # [n_held,out]
            log_n = (pred - t_held).pow(2).sum(-1).add(EPS).log()  # [n_held]
            std = log_n.std() if log_n.numel() > 1 else log_n.new_tensor(1.0)
        w1, b1, w2, b2 = (p.detach() for p in params)
        self.set_rows(expert_name, pred_w1=w1, pred_b1=b1, pred_w2=w2, pred_b2=b2, calib_mean=log_n.mean(),
                      calib_std=std.clamp(min=MIN_STD))

    def _new_predictor(self, g: torch.Generator) -> list[torch.Tensor]:
        """Fresh predictor weights w1 [ph,d], b1 [ph], w2 [out,ph], b2 [out] from the expert's own generator."""
        o, d = self.options, self.d_in
        w1 = torch.randn(o.predictor_hidden, d, generator=g) / math.sqrt(d)
        w2 = torch.randn(o.out_dim, o.predictor_hidden, generator=g) / math.sqrt(o.predictor_hidden)
        params = [w1, torch.zeros(o.predictor_hidden), w2, torch.zeros(o.out_dim)]
        return [p.to(self.target_w1.device).requires_grad_(True) for p in params]

    # ------------------------------------------------------------------ cost
    def flops_per_token(self) -> int:
        o, d, e = self.options, self.d_in, len(self.expert_names)
        target = 2 * (d * o.target_hidden + o.target_hidden * o.out_dim)
        predictors = e * 2 * (d * o.predictor_hidden + o.predictor_hidden * o.out_dim)
        return target + predictors + e * 3 * o.out_dim + 3 * d  # + the distances and normalising h
