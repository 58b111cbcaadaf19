"""Low-rank RND router: random network distillation whose cost per token does not grow with E·d. Every router
input is normalised and projected once by a shared frozen random matrix R [r, d] (r << d); the random target network
T and the per-expert predictors P_i all work in that r-dimensional space, so routing one token costs
2·d·r + E·(small predictor) instead of E·(predictor on d). Novelty n_i(z) = ||P_i(z) - T(z)||^2 is calibrated as a
z-score of log n_i against expert i's held-out novelty; the least novel experts win (top-k softmax of
-z / temperature). Each expert's base fallback threshold is calibrated on its held-out inputs: the z that a share
`fallback_quantile` of them stay under; a token above every expert's threshold goes to the base alone."""
from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..nn.routing import Routing, base_alone
from .base import ROUTERS
from .fitted import FittedRouter
from .rnd import EPS, MIN_STD, rms_normalise


class RndLowRankOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rank: int = Field(16, ge=1, description="width r of the shared random projection of the router input")
    target_hidden: int = Field(32, ge=1, description="hidden width of the random target network T (on r inputs)")
    predictor_hidden: int = Field(16, ge=1, description="hidden width of each predictor P_i (on r inputs)")
    out_dim: int = Field(16, ge=1, description="output width of T and P_i")
    steps: int = Field(400, ge=1, description="Adam steps to fit one predictor")
    lr: float = Field(3e-3, gt=0.0)
    batch_size: int = Field(256, ge=1)
    held_out: float = Field(0.2, gt=0.0, lt=1.0, description="share of the expert's inputs kept for calibration")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature over -z")
    fallback_quantile: float = Field(0.99, gt=0.0, le=1.0,
                                     description="share of an expert's held-out inputs under its fallback threshold")
    fallback: bool = Field(True, description="send tokens unfamiliar to every expert to the base alone")
    seed: int = 0


@ROUTERS.register("rnd_lowrank")
class RndLowRankRouter(FittedRouter):
    Options = RndLowRankOptions
    fit_pool = "mean"

    fit_from = "activations"

    def __init__(self, **kw):
        super().__init__(**kw)
        o = self.options
        d, r, th, ph, out = self.d_in, o.rank, o.target_hidden, o.predictor_hidden, o.out_dim
        g = torch.Generator().manual_seed(o.seed)
        self.register_buffer("projection", torch.randn(r, d, generator=g) / math.sqrt(d))  # [r, d]
        self.register_buffer("target_w1", torch.randn(th, r, generator=g) / math.sqrt(r))  # [th, r]
        self.register_buffer("target_b1", torch.randn(th, generator=g) * 0.1)  # [th]
        self.register_buffer("target_w2", torch.randn(out, th, generator=g) / math.sqrt(th))  # [out, th]
        for name, shape in (("pred_w1", (ph, r)), ("pred_b1", (ph,)), ("pred_w2", (out, ph)), ("pred_b2", (out,)),
                            ("calib_mean", ()), ("calib_std", ()), ("threshold", ())):
            self.per_expert(name, shape)

    # ------------------------------------------------------------------ networks
    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Normalise and project: h [N,d] -> z [N,r], scaled to unit rms."""
        return rms_normalise(rms_normalise(h.float()) @ self.projection.T)

    def target(self, z: torch.Tensor) -> torch.Tensor:
        """T: z [N,r] -> [N,out]."""
        return torch.relu(z @ self.target_w1.T + self.target_b1) @ self.target_w2.T

    @staticmethod
    def predict(z: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        """Every predictor at once: z [N,r], w1 [E,ph,r], b1 [E,ph], w2 [E,out,ph], b2 [E,out] -> [N,E,out]."""
        hidden = torch.relu(torch.einsum("nr,ehr->neh", z, w1) + b1)  # [N,E,ph]
        return torch.einsum("neh,eoh->neo", hidden, w2) + b2  # [N,E,out]

    def z_scores(self, h: torch.Tensor) -> torch.Tensor:
        """Calibrated novelty z of every expert: h [T,d] -> [T,E] (0 = as familiar as the expert's held-out data)."""
        z = self.project(h)
        pred = self.predict(z, self.pred_w1, self.pred_b1, self.pred_w2, self.pred_b2)  # [T,E,out]
        log_n = (pred - self.target(z).unsqueeze(1)).pow(2).sum(-1).add(EPS).log()  # [T,E]
        return (log_n - self.calib_mean) / self.calib_std.clamp(min=MIN_STD)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """-z: h [T,d] -> [T,E]; higher is more familiar."""
        return -self.z_scores(h)

    def finish(self, routing: Routing, scores: torch.Tensor) -> Routing:
        if not self.options.fallback:
            return routing
        usable = torch.isfinite(scores)  # [T,E]: masked (disabled, unfitted) experts are -inf
        familiar = (-scores <= self.threshold) & usable  # [T,E]
        return base_alone(routing, ~familiar.any(-1))

    # ------------------------------------------------------------------ fitting
    def fit(self, expert_name: str, activations: torch.Tensor) -> None:
        """Train P_i on `activations` [N,d] (expert i's router inputs); calibrate z and the fallback threshold on a
        held-out share of them."""
        o = self.options
        g = torch.Generator().manual_seed(self.expert_seed(expert_name, o.seed))
        z = self.project(activations.to(self.projection.device))  # [N,r]
        order = torch.randperm(z.shape[0], generator=g).to(z.device)
        n_held = max(1, int(round(z.shape[0] * o.held_out))) if z.shape[0] > 1 else 0
        train_idx, held_idx = (order[n_held:], order[:n_held]) if n_held else (order, order)
        with torch.no_grad():
            target = self.target(z)  # [N,out]
        params = self._new_predictor(g)
        optim = torch.optim.Adam(params, lr=o.lr)
        with torch.enable_grad():
            for _ in range(o.steps):
                pick = train_idx[torch.randint(0, len(train_idx), (min(o.batch_size, len(train_idx)),), generator=g)
                                 .to(z.device)]
                pred = self._predict_one(z[pick], params)  # [b,out]
                loss = (pred - target[pick]).pow(2).sum(-1).mean()
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
        with torch.no_grad():
            log_n = (self._predict_one(z[held_idx], params) - target[held_idx]).pow(2).sum(-1).add(EPS).log()
            mean = log_n.mean()
            std = (log_n.std() if log_n.numel() > 1 else log_n.new_tensor(1.0)).clamp(min=MIN_STD)
            z_held = (log_n - mean) / std
            threshold = torch.quantile(z_held, o.fallback_quantile) if z_held.numel() > 1 else z_held.new_tensor(4.0)
        w1, b1, w2, b2 = (p.detach() for p in params)
        self.set_rows(expert_name, pred_w1=w1, pred_b1=b1, pred_w2=w2, pred_b2=b2, calib_mean=mean, calib_std=std,
                      threshold=threshold)

    @staticmethod
    def _predict_one(z: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        """One predictor: z [N,r] -> [N,out]."""
        w1, b1, w2, b2 = params
        return torch.relu(z @ w1.T + b1) @ w2.T + b2

    def _new_predictor(self, g: torch.Generator) -> list[torch.Tensor]:
        """Fresh predictor weights w1 [ph,r], b1 [ph], w2 [out,ph], b2 [out] from the expert's own generator."""
        o = self.options
        w1 = torch.randn(o.predictor_hidden, o.rank, generator=g) / math.sqrt(o.rank)
        w2 = torch.randn(o.out_dim, o.predictor_hidden, generator=g) / math.sqrt(o.predictor_hidden)
        params = [w1, torch.zeros(o.predictor_hidden), w2, torch.zeros(o.out_dim)]
        return [p.to(self.projection.device).requires_grad_(True) for p in params]

    # ------------------------------------------------------------------ cost
    def flops_per_token(self) -> int:
        """2·d·r (projection) + T + E predictors on r inputs + the distances + normalising h and z."""
        o, d, e = self.options, self.d_in, len(self.expert_names)
        projection = 2 * d * o.rank
        target = 2 * (o.rank * o.target_hidden + o.target_hidden * o.out_dim)
        predictors = e * 2 * (o.rank * o.predictor_hidden + o.predictor_hidden * o.out_dim)
        return projection + target + predictors + e * 3 * o.out_dim + 3 * d + 3 * o.rank
