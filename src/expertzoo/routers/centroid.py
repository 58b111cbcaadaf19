"""Centroid router: per expert, the normalised mean of its router inputs over its own data (every token, or each
sequence's last token); cosine similarity to each centroid, top-k softmax with temperature."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .base import ROUTERS
from .fitted import FittedRouter


class CentroidOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pool: Literal["mean", "last"] = Field("mean", description="centroid of every token, or of each sequence's last")
    temperature: float = Field(0.1, gt=0.0, description="softmax temperature over cosine scores")


@ROUTERS.register("centroid")
class CentroidRouter(FittedRouter):
    Options = CentroidOptions
    fit_from = "activations"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.per_expert("centroids", (self.d_in,))  # [E, d] unit vectors

    @property
    def fit_pool(self) -> str:  # type: ignore[override]
        return self.options.pool

    def fit(self, expert_name: str, activations: torch.Tensor) -> None:
        """activations: [N, d] router inputs of the expert's own data."""
        self.set_rows(expert_name, centroids=F.normalize(activations.float().mean(0), dim=0))

    def scores(self, h: torch.Tensor) -> torch.Tensor:  # h: [T,d] -> cosine [T,E]
        return F.normalize(h, dim=-1) @ self.centroids.T

    def flops_per_token(self) -> int:
        return 2 * self.centroids.numel() + 3 * self.d_in  # the dot products, plus normalising h
