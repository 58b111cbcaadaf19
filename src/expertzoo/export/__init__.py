"""Exports of a zoo to formats other tools load: Mixtral and Qwen3-MoE checkpoints, and the transformers model
type `zoo`, whose Auto classes are registered when expertzoo is imported (no remote code)."""
from .formats import FORMATS, ExportFormat, export

__all__ = ["FORMATS", "ExportFormat", "export"]
