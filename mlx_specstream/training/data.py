"""Training data: mlx-lm's jsonl formats, length-bucketed batches, chitchat prompts.

A data folder holds ``train.jsonl`` and ``valid.jsonl``; each line is one of

* ``{"text": ...}``: plain text, every token is a target;
* ``{"prompt": ..., "completion": ...}``: one user turn and the answer, through the
  tokenizer's chat template; the prompt is masked (no loss on it) by default;
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a chat through the chat
  template; everything before the last message is masked by default.

A record may carry ``"truncated": true`` (written by ``distill`` when a response hit
the token limit): its last message is then not closed by an end-of-turn token.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .objective import SparseTargets, sparse_targets

Example = tuple[list[int], int]  # (tokens, index of the first target token)

HELDOUT_CONVERSATIONS = 100  # the last conversations of chitchat: never used for training


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    out = []
    with path.open() as f:
        for n, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
    return out


def _template(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> list[int]:
    toks = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    if isinstance(toks, dict):  # some tokenizers return a BatchEncoding
        toks = toks["input_ids"]
    return list(toks)


def _chat_example(
    tokenizer: Any, messages: list[dict[str, str]], mask_prompt: bool, truncated: bool
) -> Example:
    if not messages:
        raise ValueError("empty 'messages'")
    last_is_assistant = messages[-1].get("role") == "assistant"
    prefix = _template(tokenizer, messages[:-1], add_generation_prompt=last_is_assistant)
    if truncated:
        # the last message was cut at the token limit: no end-of-turn after it
        tokens = prefix + list(tokenizer.encode(messages[-1]["content"], add_special_tokens=False))
    else:
        tokens = _template(tokenizer, messages, add_generation_prompt=False)
    offset = len(prefix) if mask_prompt else 0
    if tokens[:offset] != prefix[:offset]:  # template not prefix-stable: fall back safely
        offset = 0 if not mask_prompt else min(offset, len(tokens) - 1)
    return tokens, offset


def encode_record(record: dict[str, Any], tokenizer: Any, mask_prompt: bool = True) -> Example:
    """Tokens and the first target position of one jsonl record (see module doc)."""
    truncated = bool(record.get("truncated", False))
    if "messages" in record:
        return _chat_example(tokenizer, list(record["messages"]), mask_prompt, truncated)
    if "prompt" in record and "completion" in record:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
        return _chat_example(tokenizer, messages, mask_prompt, truncated)
    if "text" in record:
        tokens = list(tokenizer.encode(record["text"]))
        eos = tokenizer.eos_token_id
        if eos is not None and (not tokens or tokens[-1] != eos):
            tokens.append(eos)
        return tokens, 0
    raise ValueError(
        f"unrecognised record (keys {sorted(record)}): expected 'text', "
        "'prompt'+'completion' or 'messages'"
    )


def load_split(
    data_dir: str | Path,
    split: str,
    tokenizer: Any,
    *,
    mask_prompt: bool = True,
    max_seq_len: int = 512,
    limit: int | None = None,
) -> list[Example]:
    """Encode ``data_dir/split.jsonl``; sequences longer than ``max_seq_len`` are cut,
    those with fewer than 2 target tokens are dropped."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found (a data folder holds train.jsonl and valid.jsonl)"
        )
    records = load_jsonl(path)
    if limit is not None:
        records = records[:limit]
    out = []
    for i, r in enumerate(records):
        try:
            tokens, offset = encode_record(r, tokenizer, mask_prompt)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: record {i + 1}: {e}") from e
        tokens = tokens[:max_seq_len]
        if len(tokens) - max(offset, 1) >= 2:
            out.append((tokens, offset))
    if not out:
        raise ValueError(f"{path}: no usable examples")
    return out


@dataclass
class Batch:
    tokens: np.ndarray  # (B, T) int32, right-padded
    targets: np.ndarray  # (B, T) bool: token t is a training target (t >= offset, t < len)

    def sparse(self, num_streams: int) -> SparseTargets:
        """The target triples of the lossless objective (cached per stream count)."""
        cache = self.__dict__.setdefault("_sparse", {})
        if num_streams not in cache:
            cache[num_streams] = sparse_targets(self.tokens, self.targets, num_streams)
        return cache[num_streams]


def make_batches(examples: list[Example], batch_tokens: int, pad_id: int = 0) -> list[Batch]:
    """Group examples of similar length so that B * T <= batch_tokens (one example per
    batch at least).  Deterministic: sorted by length."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), i))
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        n = len(examples[i][0])
        if cur and (len(cur) + 1) * n > batch_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    batches = []
    for g in groups:
        T = max(len(examples[i][0]) for i in g)
        toks = np.full((len(g), T), pad_id, dtype=np.int32)
        tgt = np.zeros((len(g), T), dtype=bool)
        for r, i in enumerate(g):
            seq, off = examples[i]
            toks[r, : len(seq)] = seq
            tgt[r, max(off, 1) : len(seq)] = True
        batches.append(Batch(toks, tgt))
    return batches


def epoch_order(num_batches: int, epoch: int, seed: int) -> list[int]:
    """The deterministic batch order of one epoch."""
    rng = np.random.default_rng(seed * 1_000_003 + epoch)
    return [int(i) for i in rng.permutation(num_batches)]


def iterate_micro_batches(num_batches: int, seed: int, start: int = 0) -> Iterator[int]:
    """Endless batch indices, epoch after epoch, starting at micro-step ``start``."""
    epoch, pos = divmod(start, num_batches)
    while True:
        order = epoch_order(num_batches, epoch, seed)
        yield from order[pos:]
        epoch, pos = epoch + 1, 0


# -- chitchat prompts -----------------------------------------------------------------
def chitchat_path() -> Path:
    """The dataset.json of the pip package chitchat-dataset, located without importing it."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the chitchat-dataset package is not installed (pip install chitchat-dataset==0.9.0)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    return path


def _first_turn(convo: dict[str, Any]) -> str:
    groups = convo.get("messages") or []
    if not groups:
        return ""
    return "\n".join(m["text"].strip() for m in groups[0] if m.get("text", "").strip())


def chitchat_prompts() -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): the first user turn of each conversation,
    in the file's order.  The last ``HELDOUT_CONVERSATIONS`` conversations are held out
    and never used for training; training prompts are deduplicated (case-insensitive)
    and exclude any held-out prompt."""
    with chitchat_path().open() as f:
        data = json.load(f)
    convos = list(data.values()) if isinstance(data, dict) else list(data)
    turns = [_first_turn(c) for c in convos]
    heldout = [t for t in turns[-HELDOUT_CONVERSATIONS:] if t]
    seen = {t.lower() for t in heldout}
    train = []
    for t in turns[:-HELDOUT_CONVERSATIONS]:
        key = t.lower()
        if t and key not in seen:
            seen.add(key)
            train.append(t)
    return train, heldout


def heldout_prompts(n: int = 30) -> list[str]:
    """The first ``n`` held-out chitchat prompts (never used for training).  Benchmarks
    use these, through the chat template with ``add_generation_prompt=True``."""
    return chitchat_prompts()[1][:n]


