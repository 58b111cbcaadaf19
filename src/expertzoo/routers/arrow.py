"""Arrow router (Ostapenko et al. 2024): no data; per LoRA expert and site the prototype p_i is the top right
singular vector of its update B·A (the input direction it changes most). Scores |x . p_i| (sign-invariant),
top-k softmax with temperature."""
from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ZooError
from .base import ROUTERS
from .fitted import FittedRouter


class ArrowOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float = Field(1.0, gt=0.0)


def top_right_singular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Top right singular vector [d_in] of B·A without forming it: a [r,d_in], b [d_out,r].

    A^T = Q R (Q [d_in,r]) gives B·A = (B R^T) Q^T; the top right singular vector of the small B R^T [d_out,r],
    mapped by Q, is that of B·A.
    """
    q, r = torch.linalg.qr(a.double().T)  # q [d_in,r], r [r,r]
    _, _, vh = torch.linalg.svd(b.double() @ r.T, full_matrices=False)  # vh [r,r], singular values descending
    return (q @ vh[0]).float()  # [d_in]


@ROUTERS.register("arrow")
class ArrowRouter(FittedRouter):
    Options = ArrowOptions
    fit_from = "weights"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.per_expert("prototypes", (self.d_in,))  # [E, d] unit vectors (sign arbitrary)

    @classmethod
    def check_experts(cls, experts) -> None:
        for spec in experts:
            if spec.kind != "lora":
                raise ValueError(f"router kind 'arrow' reads its prototypes from LoRA weights, but expert {spec.name!r} "
                                 f"is kind {spec.kind}; use lora experts, or kind centroid / rnd / phatgoose")

    def fit_weights(self, expert_name: str, expert: nn.Module) -> None:
        """Prototype of one LoRA expert from its weights (lora_A [r,d_in], lora_B [d_out,r])."""
        if not (hasattr(expert, "lora_A") and hasattr(expert, "lora_B")):
            raise ZooError(f"router kind 'arrow' needs LoRA experts; expert {expert_name!r} is kind "
                           f"{getattr(expert, 'kind', type(expert).__name__)}; use kind centroid, rnd or phatgoose")
        if not bool(expert.lora_B.detach().abs().sum() > 0):
            raise ZooError(f"expert {expert_name!r} has an all-zero LoRA B (untrained), so B·A has no direction; "
                           "train the expert before fitting arrow")
        self.set_rows(expert_name, prototypes=top_right_singular(expert.lora_A.detach(), expert.lora_B.detach()))

    def scores(self, h: torch.Tensor) -> torch.Tensor:  # h: [T,d] -> |x . p_i| [T,E]
        return (h @ self.prototypes.T).abs()

    def flops_per_token(self) -> int:
        return 2 * self.prototypes.numel()
