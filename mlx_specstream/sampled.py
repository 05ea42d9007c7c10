"""Decoding loops for sampling (temperature > 0, or a repetition penalty) with the exact
output distribution of autoregressive sampling.

They mirror ``decode.py``'s greedy generators (same prefill, context check, cache
protocol and statistics); the policy is in ``sampling.py``.  One speculative step:

1. one forward over the draft tree (root = the last sampled token, depth-d nodes =
   candidates drawn from stream d at the last accepted position);
2. the target ``p`` of every node (n, V), each node seeing its own history (context +
   path to it) in the repetition penalty;
3. one host synchronisation: ``accept_sampled`` walks the tree with recursive
   rejection sampling without replacement and draws the next token from the
   residual at the last accepted node;
4. commit the accepted path; the next tree's candidates are drawn (on the device,
   Gumbel-top-k with a key from the generation's generator) from the streams'
   processed distributions at the last accepted node.

No pruning when sampling: pruning keeps a child only if the early-exit probability
of its token is high, so the surviving children are no longer draws from ``q``
without replacement and the acceptance rule would no longer be exact.

With temp == 0 and a repetition penalty the loop is greedy on the penalised logits
(``accept_greedy``, exact match).  ``sampled_autoregressive_steps`` samples one token
per pass in the same runtime: it is the reference distribution.
"""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import numpy as np

from .decode import (
    DecodeStats,
    Pause,
    _prefill,
    _topk_indices,
    autoregressive_steps,
    check_context,
    default_tree,
    paused_pass,
)
from .model import SpecStreamModel
from .sampling import (
    SamplingParams,
    accept_sampled,
    draft_on_device,
    processed_logits,
    random_key,
    sample_from,
    target_probs,
)
from .tree import Tree, accept_greedy


def _choose_on_device(
    logits: mx.array, hist: mx.array | None, params: SamplingParams, rng: np.random.Generator
) -> mx.array:
    """The next token (scalar, on the device) from one row of logits."""
    hists = None if hist is None else [hist]
    if params.greedy:
        return mx.argmax(processed_logits(logits, hists, params)[0])
    p = target_probs(logits, hists, params)[0]
    return mx.random.categorical(mx.log(p), key=random_key(rng))


def sampled_autoregressive_steps(
    model: SpecStreamModel,
    prompt: mx.array,
    max_tokens: int,
    stats: DecodeStats,
    params: SamplingParams,
) -> Iterator[int]:
    """Autoregressive sampling in the same runtime (no streams): decode's pipelined
    loop with this sampler choosing each token on the device."""
    rng = params.make_rng()
    c = params.history_size
    hist = [prompt.reshape(-1).astype(mx.int32)[-c:] if c else None]

    def choose(logits: mx.array, prev: mx.array | None) -> mx.array:
        if prev is not None and hist[0] is not None:
            hist[0] = mx.concatenate([hist[0], prev.reshape(1).astype(mx.int32)])[-c:]
        return _choose_on_device(logits, hist[0], params, rng)

    yield from autoregressive_steps(model, prompt, max_tokens, stats, choose)


def _ancestry(tree: Tree) -> list[list[int]]:
    """For each node, the node ids of its path from the root (inclusive)."""
    out: list[list[int]] = []
    for i in range(tree.size):
        p = int(tree.parent[i])
        out.append((out[p] if p >= 0 else []) + [i])
    return out


def sampled_speculative_steps(
    model: SpecStreamModel,
    prompt: mx.array,
    max_tokens: int,
    stats: DecodeStats,
    params: SamplingParams,
    tree: Tree | None = None,
) -> Iterator[int]:
    """Speculative Streaming with sampling.  Yields tokens whose joint law is that of
    ``sampled_autoregressive_steps`` (for temp == 0: its exact tokens)."""
    cfg = model.cfg
    tree = tree if tree is not None else default_tree(cfg)
    if tree.max_depth > cfg.num_streams:
        raise ValueError(f"tree depth {tree.max_depth} exceeds {cfg.num_streams} streams")
    if tree.size == 1:  # nothing to draft: plain sampling is the fastest
        yield from sampled_autoregressive_steps(model, prompt, max_tokens, stats, params)
        return
    limit = check_context(model, prompt.shape[0], max_tokens)
    rng = params.make_rng()
    stats.accepted_per_depth = [0] * tree.max_depth
    cache = model.make_cache()
    g = cfg.num_streams
    depth_n = tree.max_depth  # streams used: stream d drafts depth d
    kmax = tree.kmax
    c = params.history_size
    greedy = params.greedy

    gather = mx.array(tree.gather_index.astype(np.int32))
    depth = mx.array(tree.depth.astype(np.int32))
    full_mask = mx.array(tree.mask)
    ancestry = [mx.array(np.array(a, dtype=np.int32)) for a in _ancestry(tree)] if c else []
    ctx: list[int] = [int(t) for t in np.array(prompt).reshape(-1)]  # tokens in the cache

    def tail(extra: list[int]) -> list[int]:
        return (ctx + extra)[-c:]

    def proposals(logits: mx.array, root_tok: int) -> tuple[mx.array | None, mx.array]:
        """(q (depth_n, V) or None when greedy, candidates (depth_n, kmax)) from the
        (depth_n, V) stream logits of the host; the streams' history is the context +
        the root."""
        hists = [tail([root_tok])] * depth_n if c else None
        if greedy:
            return None, _topk_indices(processed_logits(logits, hists, params), kmax)
        q = target_probs(logits, hists, params)
        return q, draft_on_device(q, kmax, random_key(rng))

    logits = _prefill(model, prompt, cache, with_streams=True)  # main row, then streams
    p0 = target_probs(logits[0], [tail([])] if c else None, params)[0]
    if greedy:
        first = int(mx.argmax(p0).item())
    else:
        first = sample_from(np.array(p0), rng)
    root = mx.array([first], dtype=mx.int32)
    root_tok = first
    q, cands = proposals(logits[1 : 1 + depth_n], first)
    produced = 1
    yield first

    # Adaptive pause (decode.Pause): paused tokens are sampled plainly, from the
    # target's own law, so the output law is unchanged.
    pause = Pause(cfg.draft_cost_ratio)
    while produced < max_tokens:
        if pause.active:
            if cache.offset + 1 > limit:
                return
            streams = pause.take()
            logits = paused_pass(model, root, cache, streams)
            ctx.append(root_tok)
            hist = [tail([])] if c else None
            if greedy:
                root_tok = int(mx.argmax(processed_logits(logits[:1], hist, params)[0]).item())
            else:
                root_tok = sample_from(np.array(target_probs(logits[:1], hist, params)[0]), rng)
            root = mx.array([root_tok], dtype=mx.int32)
            if streams:
                q, cands = proposals(logits[1 : 1 + depth_n], root_tok)
            stats.forward_passes += 1
            stats.step_tokens += 1
            produced += 1
            yield root_tok
            continue
        if cache.offset + tree.size > limit:
            return  # context full
        off = cache.offset
        n = tree.size
        tokens = mx.concatenate([root, cands.reshape(-1)[gather].astype(mx.int32)])
        positions = depth + off
        h = model.lower(tokens, positions, full_mask, cache)
        # The LM head on the main rows now; on the accepted node's streams only, once it
        # is known (as decode.py).
        x = model.upper_hidden(h, positions, full_mask, cache, None, True)[0]
        main = model.head(x[:n])
        hists = None
        if c:
            ctx_tail = mx.array(np.array(ctx[-c:], dtype=np.int32))
            hists = [mx.concatenate([ctx_tail, tokens[a]]) for a in ancestry]
        if greedy:
            pred = mx.argmax(processed_logits(main, hists, params), axis=-1)
            mx.eval(pred, tokens)
            tok_np = np.array(tokens)
            path = accept_greedy(tree, tok_np, np.array(pred))
            nxt_tok = int(np.array(pred)[path[-1]])
        else:
            p = target_probs(main, hists, params)
            mx.eval(p, tokens, q, cands)
            tok_np = np.array(tokens)
            path, nxt_tok = accept_sampled(
                tree, tok_np, np.array(p), np.array(q), rng, np.array(cands)
            )
        last = path[-1]
        stats.record_tree_pass(n, path)
        pause.observe(len(path))
        cache.commit(path)
        ctx.extend(int(tok_np[i]) for i in path)
        root = mx.array([nxt_tok], dtype=mx.int32)
        root_tok = nxt_tok
        host = n + last * g  # the streams of the last accepted node
        q, cands = proposals(model.head(x[host : host + depth_n]), nxt_tok)
        new_tokens = [int(tok_np[i]) for i in path[1:]] + [nxt_tok]
        for t in new_tokens:
            if produced >= max_tokens:
                return
            produced += 1
            stats.step_tokens += 1
            yield t
