"""Prompt-lookup drafting (n-gram matching in the context) behind the same verify loop.

Each step looks for the most recent earlier occurrence of the context's last n tokens
(n from ``max_ngram`` down to 1) and proposes the tokens that followed it as a chain;
one pass of the main stream (no speculative streams) verifies the chain.  Greedy output
is identical to plain decoding.  A baseline for grounded tasks, where answers copy
from the prompt, and a peer in the benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import numpy as np

from .decode import DecodeStats, _prefill, check_context
from .model import SpecStreamModel
from .tree import accept_greedy, product_tree


def find_draft(
    context: list[int], max_ngram: int = 3, num_draft: int = 4, min_ngram: int = 1
) -> list[int]:
    """Tokens that followed the latest earlier match of the context's suffix (the
    latest with a full ``num_draft`` continuation, else the longest continuation);
    suffixes of ``max_ngram`` down to ``min_ngram`` tokens are tried, longest first."""
    n_ctx = len(context)
    for n in range(min(max_ngram, n_ctx - 1), max(min_ngram, 1) - 1, -1):
        suffix = context[n_ctx - n :]
        best: list[int] = []
        for start in range(n_ctx - n - 1, -1, -1):
            if context[start : start + n] == suffix:
                follow = context[start + n : start + n + num_draft]
                if len(follow) == num_draft:
                    return follow
                if len(follow) > len(best):
                    best = follow
        if best:
            return best
    return []


def lookup_steps(
    model: SpecStreamModel,
    prompt: mx.array,
    max_tokens: int,
    stats: DecodeStats,
    max_ngram: int = 3,
    num_draft: int = 4,
    min_ngram: int = 1,
) -> Iterator[int]:
    limit = check_context(model, prompt.shape[0], max_tokens)
    stats.accepted_per_depth = [0] * num_draft
    cache = model.make_cache()
    context = [int(t) for t in np.array(prompt)]
    root = int(mx.argmax(_prefill(model, prompt, cache, with_streams=False)[0]).item())
    produced = 1
    yield root
    chains = {k: product_tree([1] * k) for k in range(num_draft + 1)}
    while produced < max_tokens:
        context.append(root)
        draft = find_draft(context, max_ngram, num_draft, min_ngram)
        draft = draft[: max(0, limit - cache.offset - 1)]
        if cache.offset + 1 + len(draft) > limit:
            return
        tree = chains[len(draft)]
        tokens = mx.array([root] + draft, dtype=mx.int32)
        positions = mx.arange(cache.offset, cache.offset + tree.size)
        mask = mx.array(tree.mask) if tree.size > 1 else None
        h = model.lower(tokens, positions, mask, cache)
        x = model.upper_hidden(h, positions, mask, cache, None, False)[0]
        pred = np.array(mx.argmax(model.head(x), axis=-1))
        tok_np = np.array([root] + draft)
        path = accept_greedy(tree, tok_np, pred)
        cache.commit(path)
        stats.forward_passes += 1
        stats.tree_nodes += tree.size
        for d in range(1, len(path)):
            stats.accepted_per_depth[d - 1] += 1
        stats.lookup_passes += len(draft) > 0
        stats.lookup_accepted += len(path) - 1
        new = [int(tok_np[i]) for i in path[1:]] + [int(pred[path[-1]])]
        context.extend(new[:-1])
        root = new[-1]
        for t in new:
            if produced >= max_tokens:
                return
            produced += 1
            stats.step_tokens += 1
            yield t
