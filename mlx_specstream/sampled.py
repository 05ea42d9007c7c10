"""Decoding loops for sampling (temperature > 0, or a repetition penalty) with the exact
output distribution of autoregressive sampling.

Both are ``decode.py``'s loops with another acceptor and proposals; the policy is in
``sampling.py``.  One speculative step of ``decode.speculative_loop`` with
``SampledAcceptor`` and ``sampled_proposals``:

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

The adaptive pause samples its plain passes from the target's own law, so the output
law is unchanged.

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
    GreedyAcceptor,
    autoregressive_steps,
    default_tree,
    speculative_loop,
)
from .drafting import Draft, Proposals, StreamDrafter, topk_indices
from .model import SpecStreamModel
from .sampling import (
    SamplingParams,
    accept_sampled,
    draft_on_device,
    processed_logits,
    random_key,
    target_probs,
)
from .tree import Tree


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


def sampled_proposals(params: SamplingParams, rng: np.random.Generator) -> Proposals:
    """The streams' proposals ``q`` (target_probs of the stream logits, every stream
    seeing the context + root as its history) and candidates drawn from them without
    replacement on the device; when greedy, the top-k of the processed logits."""
    c = params.history_size

    def proposals(stream_logits: mx.array, context: list[int], kmax: int):
        hists = [context[-c:]] * stream_logits.shape[0] if c else None
        if params.greedy:
            return None, topk_indices(processed_logits(stream_logits, hists, params), kmax)
        q = target_probs(stream_logits, hists, params)
        return q, draft_on_device(q, kmax, random_key(rng))

    return proposals


class SampledAcceptor(GreedyAcceptor):
    """Recursive rejection sampling over the tree (``accept_sampled``), each node's
    target seeing its own history; greedy on the processed logits when temp == 0."""

    def __init__(self, params: SamplingParams, rng: np.random.Generator) -> None:
        self.params, self.rng = params, rng
        self.ancestry: dict[int, tuple[Tree, list[mx.array]]] = {}

    def _histories(self, tokens: mx.array, tree: Tree, context: list[int]) -> list | None:
        """Per node: the context before the root, then the path to the node."""
        c = self.params.history_size
        if not c:
            return None
        if id(tree) not in self.ancestry:
            paths: list[list[int]] = []
            for i in range(tree.size):
                p = int(tree.parent[i])
                paths.append((paths[p] if p >= 0 else []) + [i])
            self.ancestry[id(tree)] = (tree, [mx.array(np.array(a, np.int32)) for a in paths])
        tail = mx.array(np.array(context[:-1][-c:], dtype=np.int32))
        return [mx.concatenate([tail, tokens[a]]) for a in self.ancestry[id(tree)][1]]

    def targets(self, main: mx.array, tokens: mx.array, tree: Tree,
                context: list[int]) -> mx.array:
        hists = self._histories(tokens, tree, context)
        if self.params.greedy:
            return mx.argmax(processed_logits(main, hists, self.params), axis=-1)
        return target_probs(main, hists, self.params)

    def accept(self, tree: Tree, tokens: np.ndarray, targets: np.ndarray,
               draft: Draft | None) -> tuple[list[int], int]:
        if self.params.greedy:
            return super().accept(tree, tokens, targets, draft)
        q, cands = (None, None) if draft is None else (draft.q, draft.cands)
        q, cands = (None if a is None else np.array(a) for a in (q, cands))
        return accept_sampled(tree, tokens, targets, q, self.rng, cands)


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
    rng = params.make_rng()
    drafter = StreamDrafter(tree, sampled_proposals(params, rng))
    yield from speculative_loop(model, prompt, max_tokens, stats, drafter,
                                SampledAcceptor(params, rng))
