"""Drafts from what the model wrote before (the REST idea, as one more source of the
context branch).

``mlx-specstream corpus`` tokenizes texts the model wrote (distill's train.jsonl: its own
answers) and writes them to ``draft_corpus.safetensors`` in the model folder, beside the
streams.  At decode time the corpus indexes every n-gram of ``MIN_NGRAM`` to ``MAX_NGRAM``
tokens with the continuation that most often followed it.  When the context holds no
earlier match of its own suffix, the context branch (``drafting.ContextDrafter``) drafts
the corpus's continuation of the longest suffix the corpus knows instead.  The branch is
verified like any draft, so the output does not change; it pays where the model repeats
its own phrasing from one answer to the next.

Why a step of its own: the corpus depends on the texts only, not on training or
calibration, and it drafts for trained and fresh streams alike.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .files import atomic_write

CORPUS_FILE = "draft_corpus.safetensors"
_KEY = "tokens"
MAX_NGRAM = 6  # the longest context suffix looked up
MIN_NGRAM = 2  # the shortest (one token follows too many things to predict the next)
VOTE = 4  # continuations are told apart (and counted) by their first VOTE tokens
_SEP = -1  # between two texts: no n-gram or continuation crosses it
_MASK = (1 << 64) - 1
_MULT = 0x9E3779B97F4A7C15  # odd: the n-gram hash is a polynomial mod 2**64
_MIX = 0xC2B2AE3D27D4EB4F


def hash_ngram(tokens: Sequence[int]) -> int:
    """The index key of an n-gram (its length included); ``_hash_windows`` computes the
    same value for every window of an array."""
    h = len(tokens)
    for t in tokens:
        h = (h * _MULT + int(t) + 1) & _MASK
    return h


def _hash_windows(tokens: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    h = np.full(starts.shape, n, dtype=np.uint64)
    for j in range(n):
        h = h * np.uint64(_MULT) + (tokens[starts + j] + 1).astype(np.uint64)
    return h


class DraftCorpus:
    """Token ids of texts the model wrote (``_SEP`` between texts) and, built on the first
    lookup, the index: sorted n-gram keys and where each one's chosen continuation starts."""

    def __init__(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"a draft corpus is a 1-D array of token ids, got {tokens.shape} "
                             f"{tokens.dtype}")
        if tokens.size and int(tokens.min()) < _SEP:
            raise ValueError("a draft corpus holds token ids >= 0 and -1 between texts")
        self.tokens = tokens.astype(np.int64)
        self._keys: np.ndarray | None = None
        self._follow: np.ndarray | None = None

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: Iterable[str], eos_ids: Sequence[int] = ()
                   ) -> DraftCorpus:
        """Each text tokenized without special tokens, then the first of ``eos_ids`` (an
        answer ends with one)."""
        end = list(eos_ids)[:1]
        parts: list[int] = []
        for text in texts:
            parts += tokenizer.encode(text, add_special_tokens=False) + end + [_SEP]
        return cls(np.asarray(parts, dtype=np.int64))

    @property
    def num_texts(self) -> int:
        return int((self.tokens == _SEP).sum())

    @property
    def num_tokens(self) -> int:
        return int((self.tokens != _SEP).sum())

    # ------------------------------------------------------------------------- the index

    def index(self) -> None:
        """Build the n-gram index (once; the first lookup does it otherwise)."""
        if self._keys is None:
            self._build()

    def _build(self) -> None:
        tok = self.tokens
        size = tok.size
        pad = np.concatenate([tok, np.full(MAX_NGRAM + VOTE, _SEP, dtype=np.int64)])
        bad = pad == _SEP
        keys, follow, counts_key = [], [], []
        for n in range(MIN_NGRAM, MAX_NGRAM + 1):
            # windows of n tokens inside one text with at least one token after them
            starts = np.arange(max(size - n, 0))
            inside = ~np.lib.stride_tricks.sliding_window_view(bad, n + 1)[: starts.size].any(1)
            starts = starts[inside]
            if not starts.size:
                continue
            key = _hash_windows(pad, starts, n)
            ch = np.full(starts.shape, VOTE, dtype=np.uint64)  # the continuation's hash
            alive = np.ones(starts.shape, dtype=bool)  # a text's end ends it
            for j in range(VOTE):
                t = pad[starts + n + j]
                alive &= t != _SEP
                ch = ch * np.uint64(_MULT) + np.where(alive, t + 1, 0).astype(np.uint64)
            keys.append(key)
            follow.append(starts + n)
            counts_key.append(key ^ (ch * np.uint64(_MIX)))
        if not keys:
            self._keys = np.zeros(0, np.uint64)
            self._follow = np.zeros(0, np.int64)
            return
        key, at, pair = np.concatenate(keys), np.concatenate(follow), np.concatenate(counts_key)
        # count each (n-gram, continuation) pair; keep its earliest occurrence
        order = np.lexsort((at, pair))
        sp = pair[order]
        first = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]])
        count = np.diff(np.r_[first, sp.size])
        rep = order[first]
        # per n-gram the most frequent continuation (ties: the earliest)
        o = np.lexsort((at[rep], -count, key[rep]))
        ks = key[rep][o]
        keep = np.r_[True, ks[1:] != ks[:-1]]
        self._keys = ks[keep]
        self._follow = at[rep][o][keep]

    @property
    def num_ngrams(self) -> int:
        self.index()
        return int(self._keys.size)

    def lookup(self, context: Sequence[int], num_draft: int) -> list[int]:
        """The chosen continuation (at most ``num_draft`` tokens, never past a text's end)
        of the longest suffix of ``context`` (``MAX_NGRAM`` down to ``MIN_NGRAM`` tokens)
        that the corpus holds; [] when none."""
        self.index()
        keys = self._keys
        if not keys.size or num_draft < 1:
            return []
        for n in range(min(MAX_NGRAM, len(context)), MIN_NGRAM - 1, -1):
            h = np.uint64(hash_ngram(context[-n:]))
            i = int(np.searchsorted(keys, h))
            if i < keys.size and keys[i] == h:
                at = int(self._follow[i])
                out = self.tokens[at : at + num_draft].tolist()
                return out[: out.index(_SEP)] if _SEP in out else out
        return []

    # ------------------------------------------------------------------------- the file

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CORPUS_FILE
        arr = mx.array(self.tokens.astype(np.int32))
        atomic_write(path, lambda p: mx.save_safetensors(str(p), {_KEY: arr}))
        return path


def load_draft_corpus(folder: str | Path, vocab_size: int) -> DraftCorpus | None:
    """The folder's corpus, or None when it has none; a file that cannot be read or whose
    ids do not fit the vocabulary raises ValueError."""
    path = Path(folder) / CORPUS_FILE
    if not path.is_file():
        return None
    try:
        tokens = np.array(mx.load(str(path))[_KEY])
        corpus = DraftCorpus(tokens)
    except Exception as e:
        raise ValueError(f"cannot read the draft corpus {path}: {e}") from e
    if corpus.tokens.size and int(corpus.tokens.max()) >= vocab_size:
        raise ValueError(
            f"the draft corpus {path} holds token ids >= {vocab_size} (this model's "
            "vocabulary): it was written for another tokenizer; write it again with "
            f"'mlx-specstream corpus --model {Path(folder)} --data TEXTS --force'"
        )
    return corpus


# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .vocab import add_text_arguments

    add_text_arguments(p)
    p.add_argument("--force", action="store_true",
                   help=f"replace the folder's {CORPUS_FILE}")


def run(args: argparse.Namespace) -> int:
    import json

    from mlx_lm.utils import load_tokenizer

    from .models import resolve_model
    from .vocab import output_texts

    folder = resolve_model(args.model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a model folder")
    if (folder / CORPUS_FILE).exists() and not args.force:
        raise FileExistsError(f"{folder / CORPUS_FILE} exists; pass --force to replace it")
    texts = [t for path in args.data for t in output_texts(path)]
    if not texts:
        raise ValueError("no texts: give the model's own outputs (distill's train.jsonl)")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    corpus = DraftCorpus.from_texts(tokenizer, texts, eos)
    path = corpus.save(folder)
    print(f"wrote {path}: {corpus.num_tokens:,} tokens of {corpus.num_texts:,} texts "
          f"({corpus.num_ngrams:,} n-grams of {MIN_NGRAM}-{MAX_NGRAM} tokens); the context "
          "branch drafts from it when lookup_branches > 0 and lookup_corpus is on")
    return 0
