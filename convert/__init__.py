"""Checkpoint conversion: a Hugging Face folder or a GGUF file -> a model folder that plain
``mlx_lm.load`` reads, plus the speculative-streaming config section and stream parameters.

Installed as ``mlx_specstream.convert`` (the repository's top-level ``convert/`` folder).
"""

from .writer import ConvertResult, convert, convert_checkpoint

__all__ = ["convert", "convert_checkpoint", "ConvertResult"]
