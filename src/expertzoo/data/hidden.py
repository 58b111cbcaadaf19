"""Examples with their frozen prefix computed once: the residual stream entering a zoo's first site layer, per
example, kept in memory and optionally in a safetensors file under the cache folder (keyed by the base's weights below
that layer and the examples' tokens), so experts at upper layers train and evaluate without rerunning the layers below."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import ZooError
from ..nn.prefix import from_layer, hidden_before, prefix_layers
from ..nn.sites import decoder_layers
from . import Example, collate


class PrefixCache:
    """Hidden states [n_i, d] entering decoder layer `layer` for each example of `examples` (fp32, exact)."""

    def __init__(self, model: nn.Module, layer: int, examples: list[Example], *, pad_id: int, batch_size: int = 8,
                 folder: str | Path | None = None, progress: bool = True):
        if layer < 1:
            raise ZooError(f"a prefix cache needs at least one layer below the first site (got layer {layer})")
        self.model, self.layer, self.pad_id = model, layer, pad_id
        self.index = {id(e): i for i, e in enumerate(examples)}
        path = Path(folder) / f"prefix-{self._key(examples)}.safetensors" if folder is not None else None
        if path is not None and path.is_file():
            stored = load_file(path)
            self.hidden = [stored[str(i)] for i in range(len(examples))]
        else:
            self.hidden = self._compute(examples, batch_size, progress)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # renamed into place when whole
                save_file({str(i): h.contiguous() for i, h in enumerate(self.hidden)}, tmp)
                os.replace(tmp, path)

    def _key(self, examples: list[Example]) -> str:
        """Digest of what the cached states depend on: the input embeddings, the decoder layers below `layer`, and
        the examples' tokens."""
        digest = hashlib.sha256(f"{type(self.model).__name__}:{self.layer}".encode())
        below = [self.model.get_input_embeddings(), *decoder_layers(self.model)[1][:self.layer]]
        for module in below:
            for n, t in module.state_dict().items():
                digest.update(n.encode())
                digest.update(t.detach().float().cpu().numpy().tobytes())
        for e in examples:
            digest.update(torch.tensor(e.input_ids, dtype=torch.int64).numpy().tobytes())
        return digest.hexdigest()[:24]

    @torch.no_grad()
    def _compute(self, examples: list[Example], batch_size: int, progress: bool) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        out: list[torch.Tensor] = []
        starts = range(0, len(examples), batch_size)
        for i in tqdm(starts, desc=f"layers 0-{self.layer - 1} once", disable=not progress, leave=False):
            part = examples[i:i + batch_size]
            batch = collate(part, self.pad_id)
            h = hidden_before(self.model, self.layer, batch["input_ids"].to(device),
                              batch["attention_mask"].to(device))  # [B,S,d]
            out += [h[j, :len(e.input_ids)].float().cpu() for j, e in enumerate(part)]
        return out

    def batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Like `collate`, with `inputs_embeds` [B,S,d] (zeros at pads) in place of `input_ids`."""
        out = collate(examples, self.pad_id)
        embeds = torch.zeros(*out["input_ids"].shape, self.hidden[0].shape[-1])  # [B,S,d]
        for j, e in enumerate(examples):
            if id(e) not in self.index:
                raise ZooError("an example outside this prefix cache was asked for; build the cache from the same examples")
            h = self.hidden[self.index[id(e)]]  # [n,d]
            embeds[j, :len(h)] = h
        dtype = next(self.model.parameters()).dtype
        return {"inputs_embeds": embeds.to(dtype), "attention_mask": out["attention_mask"], "labels": out["labels"]}

    def batches(self, examples: list[Example], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(examples), batch_size):
            yield self.batch(examples[i:i + batch_size])

    def running(self):
        """Context in which the model runs from the cached layer on (see `from_layer`)."""
        return from_layer(self.model, self.layer)


def prefix_cache(model: nn.Module, site_layers: list[int], examples: list[Example], *, pad_id: int,
                 batch_size: int = 8, folder: str | Path | None = None, progress: bool = True) -> PrefixCache | None:
    """A PrefixCache of `examples` below the first of `site_layers`, or None where nothing can be skipped (sites at
    layer 0, or an architecture whose layers do not take the embeddings as they are; see nn/prefix.py)."""
    layer = prefix_layers(model, site_layers)
    if layer == 0:
        return None
    return PrefixCache(model, layer, examples, pad_id=pad_id, batch_size=batch_size, folder=folder, progress=progress)
