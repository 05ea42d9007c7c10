"""The draft vocabulary (the FR-Spec idea): the streams draft from the K tokens most frequent
in the model's own outputs, so that their LM head computes K rows, not the whole vocabulary.

``mlx-specstream vocab`` counts the tokens of texts the model wrote (distill's train.jsonl:
the assistant turns) and writes the ranking of every token id, most frequent first, to
``draft_vocab.safetensors`` in the model folder, beside the streams; ``draft_vocab_size`` in
the folder's config picks how many of them the streams use (0: the whole head), so K can be
changed without counting again.  Verification keeps the whole head: the output does not
change, only which tokens can be drafted.

Why a step of its own: the subset depends on the texts and on nothing that training or
calibration compute, and it applies to trained and fresh streams alike.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import CONFIG_KEY, SpecStreamConfig
from .files import atomic_write, atomic_write_text

VOCAB_FILE = "draft_vocab.safetensors"
_KEY = "token_ids"


class DraftHead:
    """The LM head (or tied embedding) rows of a draft vocabulary, gathered once; called on
    final-normed hidden states it gives logits over the whole vocabulary with only the draft
    vocabulary's entries computed (the rest -inf)."""

    def __init__(self, base: nn.Module, token_ids: mx.array) -> None:
        layer = base.model.embed_tokens if base.args.tie_word_embeddings else base.lm_head
        ids = mx.array(token_ids).astype(mx.int32).reshape(-1)
        self.vocab_size = int(layer.weight.shape[0])
        if ids.size == 0 or int(ids.max()) >= self.vocab_size or int(ids.min()) < 0:
            raise ValueError(
                f"a draft vocabulary holds ids in [0, {self.vocab_size}) and at least one"
            )
        self.ids = ids
        self.weight = layer.weight[ids]
        self.quantized = "scales" in layer
        if self.quantized:
            self.scales = layer.scales[ids]
            self.biases = layer.biases[ids] if "biases" in layer else None
            self.group_size, self.bits = layer.group_size, layer.bits
            self.mode = getattr(layer, "mode", "affine")
        self.bias = layer.bias[ids] if "bias" in layer and layer.bias is not None else None
        self._pos: mx.array | None = None
        mx.eval([a for a in vars(self).values() if isinstance(a, mx.array)])

    @property
    def size(self) -> int:
        return int(self.ids.size)

    def positions(self, token_ids: mx.array) -> mx.array:
        """Each token id's index in the draft vocabulary, -1 for ids outside it."""
        if self._pos is None:
            pos = np.full((self.vocab_size,), -1, dtype=np.int32)
            pos[np.array(self.ids)] = np.arange(self.size, dtype=np.int32)
            self._pos = mx.array(pos)
        return self._pos[token_ids]

    def __call__(self, h: mx.array) -> mx.array:
        sub = self.subset_logits(h)
        full = mx.full((*sub.shape[:-1], self.vocab_size), -mx.inf, dtype=sub.dtype)
        full[..., self.ids] = sub
        return full

    def subset_logits(self, h: mx.array) -> mx.array:
        """Logits over the draft vocabulary only, (..., K) in its order (training and
        ranking use these; drafting scatters them into the whole vocabulary)."""
        if self.quantized:
            sub = mx.quantized_matmul(
                h,
                self.weight,
                self.scales,
                self.biases,
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
            )
        else:
            sub = h @ self.weight.T
        if self.bias is not None:
            sub = sub + self.bias
        return sub


# ----------------------------------------------------------------------------- counting


def output_texts(path: str | Path) -> list[str]:
    """The texts the model wrote in ``path``: the assistant turns (or completions) of a
    .jsonl file as distill writes it, or the lines of any other text file."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    from .training.data import load_jsonl

    texts: list[str] = []
    for row in load_jsonl(path):
        if isinstance(row.get("completion"), str):
            texts.append(row["completion"])
        for message in row.get("messages") or []:
            if message.get("role") == "assistant" and isinstance(message.get("content"), str):
                texts.append(message["content"])
        if isinstance(row.get("text"), str):
            texts.append(row["text"])
    return texts


def count_tokens(
    tokenizer: Any, texts: Iterable[str], vocab_size: int, eos_ids: Sequence[int] = ()
) -> np.ndarray:
    """How often each token id occurs in ``texts`` (tokenized without special tokens); each
    text also counts one of each ``eos_ids`` (an answer ends with one)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for text in texts:
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < vocab_size)]
        counts += np.bincount(ids, minlength=vocab_size)
        for e in eos_ids:
            if 0 <= e < vocab_size:
                counts[e] += 1
    return counts


def rank_tokens(counts: np.ndarray) -> np.ndarray:
    """Every token id, most frequent first (ties: lower id first)."""
    return np.argsort(-counts, kind="stable").astype(np.int32)


def save_draft_vocab(folder: str | Path, ranking: np.ndarray) -> Path:
    path = Path(folder) / VOCAB_FILE
    arr = mx.array(np.asarray(ranking, dtype=np.int32))
    atomic_write(path, lambda p: mx.save_safetensors(str(p), {_KEY: arr}))
    return path


def load_draft_vocab(folder: str | Path, size: int) -> mx.array | None:
    """The first ``size`` ids of the folder's ranking; None when ``size`` is 0."""
    if size <= 0:
        return None
    path = Path(folder) / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"draft_vocab_size is {size} but {path} does not exist; write it with "
            f"'mlx-specstream vocab --model {folder} --data TEXTS' or set draft_vocab_size to 0"
        )
    try:
        ranking = mx.load(str(path))[_KEY]
    except Exception as e:
        raise ValueError(f"cannot read the draft vocabulary {path}: {e}") from e
    if size > ranking.size:
        raise ValueError(f"draft_vocab_size {size} exceeds the {ranking.size} ids in {path}")
    return ranking[:size]


def set_draft_vocab_size(folder: str | Path, size: int) -> None:
    """Write ``draft_vocab_size`` into the folder's speculative-streaming config section."""
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    section = dict(config.get(CONFIG_KEY) or {})
    section["draft_vocab_size"] = int(size)
    SpecStreamConfig.from_dict(section)  # validate
    config[CONFIG_KEY] = section
    atomic_write_text(config_path, json.dumps(config, indent=4))


def build_draft_vocab(
    folder: str | Path, texts: Sequence[str], size: int, tokenizer: Any | None = None
) -> dict[str, Any]:
    """Count ``texts`` with the folder's tokenizer, write the ranking and set
    ``draft_vocab_size``; returns what the draft vocabulary covers."""
    folder = Path(folder)
    if not texts:
        raise ValueError("no texts to count: give the model's own outputs (distill's train.jsonl)")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    vocab_size = int(config["vocab_size"])
    if not 0 <= size <= vocab_size:
        raise ValueError(f"--size must be in [0, {vocab_size}] (the vocabulary), got {size}")
    if tokenizer is None:
        from mlx_lm.utils import load_tokenizer

        tokenizer = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    counts = count_tokens(tokenizer, texts, vocab_size, eos)
    ranking = rank_tokens(counts)
    save_draft_vocab(folder, ranking)
    set_draft_vocab_size(folder, size)
    total = int(counts.sum())
    covered = int(counts[ranking[:size]].sum()) if size else total
    return {
        "texts": len(texts),
        "tokens": total,
        "distinct": int((counts > 0).sum()),
        "size": size,
        "coverage": covered / max(total, 1),
    }


# ----------------------------------------------------------------------------- CLI


def add_text_arguments(p: argparse.ArgumentParser) -> None:
    """--model and --data: the commands that read texts the model wrote (vocab, corpus)."""
    p.add_argument("--model", default=None, help="model folder or built-in model name")
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="texts the model wrote: distill's train.jsonl (assistant turns) or a text file "
        "(one text a line); may be repeated",
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_text_arguments(p)
    p.add_argument(
        "--size",
        type=int,
        default=16384,
        help="K, the number of most frequent tokens the streams draft from (0: whole head)",
    )


def run(args: argparse.Namespace) -> int:
    from .models import resolve_model

    folder = resolve_model(args.model)
    texts = [t for path in args.data for t in output_texts(path)]
    r = build_draft_vocab(folder, texts, args.size)
    print(
        f"counted {r['tokens']:,} tokens of {r['texts']:,} texts ({r['distinct']:,} distinct); "
        f"wrote {folder / VOCAB_FILE}; the streams draft from the {r['size']:,} most frequent "
        f"tokens (draft_vocab_size), {100 * r['coverage']:.2f}% of the counted tokens"
    )
    return 0
