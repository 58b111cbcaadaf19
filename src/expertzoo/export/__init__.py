"""Exports of a zoo to formats other tools load: Mixtral and Qwen3-MoE checkpoints, GGUF for llama.cpp, and the
transformers model type `zoo`, whose Auto classes are registered when expertzoo is imported (no remote code)."""
from .formats import FORMATS, ExportFormat, export
from . import gguf  # noqa: F401  (registers --format gguf)

__all__ = ["FORMATS", "ExportFormat", "export"]
