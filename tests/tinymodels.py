"""Tiny random mlx-lm models built in memory (no files) for fast tests, and tiny training
data they can learn."""

from __future__ import annotations

import importlib

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.model import SpecStreamModel
from mlx_specstream.training.data import Batch, make_batches

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

MODULES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def tiny_base(model_type: str = "llama", seed: int = 0, vocab: int = 64, layers: int = 4,
              spread: float = 0.5):
    """A tiny random base model whose greedy output varies (weights ~ N(0, spread))."""
    mod = importlib.import_module(f"mlx_lm.models.{MODULES[model_type]}")
    kw = dict(
        model_type=model_type, hidden_size=32, num_hidden_layers=layers, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab,
        rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=1024,
    )
    if model_type == "qwen3":
        kw["head_dim"] = 8
    fields = getattr(mod.ModelArgs, "__dataclass_fields__", {})
    args = mod.ModelArgs(**{k: v for k, v in kw.items() if k in fields})
    mx.random.seed(seed)
    base = mod.Model(args)
    base.update(
        tree_map(
            lambda p: mx.random.normal(p.shape) * spread if p.ndim == 2 else mx.ones(p.shape),
            base.parameters(),
        )
    )
    mx.eval(base.parameters())
    return base


def tiny_model(model_type: str = "llama", seed: int = 0, lora_rank: int = 0,
               random_lora: bool = False, **cfg) -> SpecStreamModel:
    base = tiny_base(model_type, seed)
    spec = SpecStreamConfig(**{"num_streams": 3, "stream_layers": 2, "tree_topk": [3, 2, 1],
                               "stream_lora_rank": lora_rank, **cfg})
    model = SpecStreamModel(base, spec)
    if random_lora:
        model.streams.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.2,
                                      model.streams.parameters()))
    mx.eval(model.parameters())
    return model


def cyclic_batches(n_seq: int = 12, length: int = 24, seed: int = 0,
                   rules: tuple[tuple[int, int], ...] = ((3, 1), (5, 7), (7, 2)),
                   per_batch: int = 4, vocab: int = 64) -> list[Batch]:
    """Sequences of an affine recurrence x[t+1] = (a*x[t] + b) % vocab, one rule (a, b)
    after the other: learnable n-grams for the streams.  ``per_batch`` sequences a batch."""
    rng = np.random.default_rng(seed)
    ex = []
    for i in range(n_seq):
        a, b = rules[i % len(rules)]
        x = int(rng.integers(0, vocab))
        seq = [x]
        for _ in range(length - 1):
            x = (a * x + b) % vocab
            seq.append(x)
        ex.append((seq, 0))
    return make_batches(ex, batch_tokens=per_batch * length)


def main_logits(model: SpecStreamModel, tokens: mx.array) -> mx.array:
    """The main stream's logits, evaluated."""
    out = model(tokens, with_streams=False)[0]
    mx.eval(out)
    return out
