"""What a checkpoint reader hands to the writer: a :class:`Source`.

The readers (``hf``, ``gguf``) and the writer all import this module and never each other's,
so a reader can be added without touching the writer's imports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

Shape = tuple[int, ...]


class LazyWeights(Mapping[str, mx.array]):
    """Tensors made one at a time when they are looked up (e.g. dequantized from a memory-mapped
    file), so that a reader never holds more than the tensor being converted; the shapes are
    known without reading anything."""

    def __init__(self, shapes: dict[str, Shape], load: Callable[[str], mx.array]) -> None:
        self._shapes = dict(shapes)
        self._load = load

    def __getitem__(self, name: str) -> mx.array:
        if name not in self._shapes:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shapes(self) -> dict[str, Shape]:
        return dict(self._shapes)


@dataclass
class Source:
    """A checkpoint with Hugging Face tensor names, its weights read lazily.

    sanitized: the names and shapes are already mlx-lm's (a reader that builds them itself), so
    the model's ``sanitize`` need not, and for :class:`LazyWeights` must not, touch every tensor.
    """

    path: Path
    kind: str  # "hf" or "gguf"
    config: dict[str, Any]
    weights: Mapping[str, mx.array]
    origin: dict[str, str]  # tensor name -> file it came from (for error messages)
    quantization: dict[str, Any] | None
    write_tokenizer: Callable[[Path], None]
    sanitized: bool = False

    def shapes(self) -> dict[str, Shape]:
        if isinstance(self.weights, LazyWeights):
            return self.weights.shapes()
        return {name: tuple(value.shape) for name, value in self.weights.items()}
