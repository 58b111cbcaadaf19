"""Expert-choice router (Zhou et al. 2022): each expert takes its top-C tokens by router probability,
C = ceil(capacity_factor * tokens / experts), so load is balanced by construction and a token may get 0..E experts
(none: the base alone). NOT batch-invariant in batch mode: a token's experts depend on the other sequences of the
batch, which an adversarial batch-mate can exploit ("Buffer Overflow in Mixture of Experts", Hayes et al. 2024).
`per_sequence: true` (the default) computes capacities within each sequence, pads excluded, so batch-mates never
matter; a token's experts still depend on the other tokens of its own sequence, later ones included. Capacities
are read on the host (a host sync per site): the one router kind a compiled zoo cannot trace in one graph."""
from __future__ import annotations

import torch
from pydantic import Field

from ..nn.routing import NULL, RouteInput, Routing, base_alone, normalise_selected, z_loss
from .base import ROUTERS
from .scored import ScoredOptions, ScoredRouter


class ExpertChoiceOptions(ScoredOptions):
    capacity_factor: float = Field(2.0, gt=0.0, description="experts per token on average: C = ceil(cf * n / E)")
    per_sequence: bool = Field(True, description="capacities within each sequence (batch-invariant)")


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(ScoredRouter):
    Options = ExpertChoiceOptions
    batch_invariant = False  # the kind in general; an instance with per_sequence: true is
    host_sync = True  # capacities read the number of allowed experts and real tokens on the host

    def __init__(self, **kw):
        super().__init__(**kw)
        self.batch_invariant = self.options.per_sequence

    def groups(self, inp: RouteInput) -> torch.Tensor:
        """Real-token mask [G,S] of the groups that share capacity: sequences, or the whole batch as one group."""
        mask = inp.sequences()  # [B,S]
        return mask if self.options.per_sequence else mask.reshape(1, -1)

    def forward(self, inp: RouteInput) -> Routing:
        h, allowed = inp.h, inp.allowed  # [T, d_in], [E]
        n_tokens, n_experts = h.shape[0], len(self.expert_names)
        n_allowed = int(allowed.sum())
        if n_allowed == 0 or n_tokens == 0:
            return Routing(weights=h.new_zeros(n_tokens, 0).float(), indices=h.new_zeros(n_tokens, 0).long())
        logits = self.logits(h, allowed)  # [T,E]
        probs = torch.softmax(logits, dim=-1)  # [T,E] token-to-expert affinities
        real = self.groups(inp)  # [G,S]
        capacity = torch.ceil(self.options.capacity_factor * real.sum(-1) / n_allowed)  # [G]
        score = probs.detach().reshape(*real.shape, n_experts).masked_fill(~real.unsqueeze(-1), -1.0)  # [G,S,E]
        rank = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # [G,S,E]: place in expert's queue
        picked = (rank < capacity[:, None, None]) & real.unsqueeze(-1) & allowed  # [G,S,E]
        picked = picked.reshape(n_tokens, n_experts)  # [T,E]
        idx = torch.arange(n_experts, device=h.device).expand(n_tokens, -1).masked_fill(~picked, NULL)  # [T,E]
        routing = Routing(weights=normalise_selected(probs, picked), indices=idx, logits=logits)
        if self.training:
            routing.aux["z"] = z_loss(logits.masked_fill(~allowed, -1e4))
        return base_alone(routing, ~picked.any(-1))
