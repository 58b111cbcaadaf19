"""FittedRouter: the shared base of routers built from data one expert at a time (centroid, rnd, phatgoose,
arrow). Per-expert state lives in buffers whose first axis is the expert (saved with the zoo); an expert's
rows change only when that expert is fitted, so fitting or adding one expert leaves the others bit-identical."""
from __future__ import annotations

import zlib

import torch

from ..errors import ZooError
from ..nn.routing import RouteInput, Routing, topk_routing, uniform_routing
from .base import Router


class FittedRouter(Router):
    """Scores [T,E] from fitted per-expert state; top-k softmax of scores / temperature over fitted experts.

    Before any expert is fitted every allowed expert gets equal weight (as the uniform router); afterwards an
    expert that is not fitted yet is never chosen. `fit_pool` names the router inputs `fit` wants: every real
    token ("mean") or each sequence's last ("last").
    """

    fit_pool: str = "mean"
    supports_always_on_base = False

    def __init__(self, **kw):
        super().__init__(**kw)
        self._per_expert: dict[str, tuple[int, ...]] = {}
        self.per_expert("fitted", ())  # [E] 1.0 once the expert is fitted
        self.any_fitted = False  # `fitted.any()` kept on the host: routing never reads it from the device

    # ------------------------------------------------------------------ per-expert state
    def per_expert(self, name: str, shape: tuple[int, ...]) -> None:
        """Register a zero buffer [E, *shape] whose row i belongs to expert i."""
        self._per_expert[name] = shape
        self.register_buffer(name, torch.zeros(len(self.expert_names), *shape))

    def row(self, expert_name: str) -> int:
        if expert_name not in self.expert_names:
            raise ZooError(f"no expert named {expert_name!r} at this router; it has: {', '.join(self.expert_names)}")
        return self.expert_names.index(expert_name)

    def set_rows(self, expert_name: str, **values: torch.Tensor) -> None:
        """Write expert `expert_name`'s rows of the named buffers and mark it fitted."""
        i = self.row(expert_name)
        with torch.no_grad():
            for name, value in values.items():
                getattr(self, name)[i] = value.to(getattr(self, name).dtype)
            self.fitted[i] = 1.0
        self.any_fitted = True

    def expert_seed(self, expert_name: str, salt: int = 0) -> int:
        """A seed of its own per expert: fitting one expert never draws from another's random stream."""
        return zlib.crc32(f"{expert_name}/{self.d_in}/{salt}".encode())

    def add_expert(self, name: str) -> None:
        for buf, shape in self._per_expert.items():
            old = getattr(self, buf)
            setattr(self, buf, torch.cat([old, old.new_zeros(1, *shape)]))
        super().add_expert(name)

    def remove_expert(self, name: str) -> None:
        i = self.row(name)
        for buf in self._per_expert:
            old = getattr(self, buf)
            setattr(self, buf, torch.cat([old[:i], old[i + 1:]]))
        self.any_fitted = bool(self.fitted.any())
        super().remove_expert(name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.state_loaded()

    def state_loaded(self) -> None:
        self.any_fitted = bool(self.fitted.any())

    # ------------------------------------------------------------------ routing
    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Higher is better: h [T, d_in] float32 -> [T, E]."""
        raise NotImplementedError

    @property
    def temperature(self) -> float:
        return float(getattr(self.options, "temperature", 1.0))

    def forward(self, inp: RouteInput) -> Routing:
        h, allowed = inp.h, inp.allowed  # [T, d_in], [E]
        if not self.any_fitted:
            return uniform_routing(h.shape[0], allowed)
        usable = allowed & self.fitted.bool()  # [E]
        scores = self.scores(h.float()).masked_fill(~usable, float("-inf"))  # [T,E]
        routing = topk_routing(scores / self.temperature, k=self.top_k, n_experts=len(self.expert_names),
                               allowed=usable)
        return self.finish(routing, scores)

    def finish(self, routing: Routing, scores: torch.Tensor) -> Routing:
        """A last word on the routing given the masked scores [T,E] (rnd: unfamiliar tokens to the base)."""
        return routing
