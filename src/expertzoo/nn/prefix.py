"""The frozen prefix of a zoo: the decoder layers below its first site. Their output (the residual stream entering
the first zoo layer) is the same whatever the experts and routers do, so it can be computed once per example and the
model run from that layer on: `hidden_before` computes it, `from_layer` runs the rest on it."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from .sites import decoder_layers

# Model types whose backbone feeds `inputs_embeds` unchanged into its first decoder layer (positions enter through
# rotary embeddings of the position ids, scaled embeddings in the embedding module itself), each checked by a test
# that the prefix path equals the full forward. Others (GPT-2 adds position embeddings to `inputs_embeds`) run whole.
PREFIX_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text"})


class _Reached(Exception):
    """Raised by the hook on the first zoo layer once its input is captured: the rest of the forward is not needed."""


class PassThrough(nn.Module):
    """Stands in for a skipped decoder layer: returns the hidden states it is given."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


def prefix_layers(model: nn.Module, site_layers: list[int]) -> int:
    """How many decoder layers below the first site can be skipped (0: none, or the architecture is not supported)."""
    if getattr(model.config, "model_type", None) not in PREFIX_MODEL_TYPES or not site_layers:
        return 0
    return min(site_layers)


@torch.no_grad()
def hidden_before(model: nn.Module, layer: int, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The residual stream entering decoder layer `layer`: [B,S,d], computed by the model itself up to there."""
    found: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        found.append(args[0] if args else kwargs["hidden_states"])
        raise _Reached

    handle = decoder_layers(model)[1][layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Reached:
        pass
    finally:
        handle.remove()
    return found[0]


@contextlib.contextmanager
def from_layer(model: nn.Module, layer: int) -> Iterator[None]:
    """Inside, `model(inputs_embeds=h, attention_mask=m)` runs decoder layers `layer`.. on h (the output of
    `hidden_before`) and equals the full forward of the same tokens. The layers below are swapped for pass-throughs
    for the duration, so the model must not serve other callers meanwhile."""
    _, layers = decoder_layers(model)
    kept = [layers[i] for i in range(layer)]
    for i in range(layer):
        layers[i] = PassThrough()
    try:
        yield
    finally:
        for i, module in enumerate(kept):
            layers[i] = module
