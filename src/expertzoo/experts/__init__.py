"""Expert kinds, one per file, each registered in EXPERTS. Null experts are router slots, not modules."""
from .base import EXPERTS, Expert
from . import block_lora, dit, ffn, lora, mlp  # noqa: F401  (registers the kinds)

__all__ = ["EXPERTS", "Expert"]
