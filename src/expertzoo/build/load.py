"""`load`: a zoo folder back into a Zoo (the base from the config's `base` spec, or the model passed in)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from ..config import parse_config
from ..errors import ZooError
from ..io.zoo_folder import CONFIG_FILE, WEIGHTS_FILE, read_zoo_meta, read_zoo_weights
from ..zoo import Zoo
from .assemble import build


def load(directory: str | Path, *, model: nn.Module | None = None, tokenizer: Any = None) -> Zoo:
    """Load a zoo saved by `Zoo.save`: the base from its spec, then the zoo's own weights."""
    directory = Path(directory)
    meta = read_zoo_meta(directory)
    try:
        config = parse_config(meta.get("config"))
    except ZooError as err:
        raise ZooError(f"{str(directory / CONFIG_FILE)!r} holds a bad config ({err}); rebuild the zoo") from None
    zoo = build(config, model=model, tokenizer=tokenizer, load_sources=False)
    zoo.mark_base_params(list(meta.get("base_params") or []))
    zoo.provenance = {n: p for n, p in (meta.get("provenance") or {}).items() if n in zoo.expert_names}
    state = read_zoo_weights(directory)
    zoo.load_zoo_state_dict(state, source=str(directory / WEIGHTS_FILE))
    return zoo
