"""Decoding loops for sampling (temperature > 0, or a repetition penalty) with the exact
output distribution of autoregressive sampling.

Both are ``decode.py``'s loops with another acceptor and proposals; the policy is in
``sampling.py``.  One speculative step of ``decode.speculative_loop`` with
``SampledAcceptor`` and ``sampled_proposals``:

1. one forward over the draft tree (root = the last sampled token, depth-d nodes =
   candidates drawn from stream d at the last accepted position);
2. the target ``p`` of every node (n, V), each node seeing its own history (context +
   path to it) in the repetition penalty;
3. ``accept_sampled_on_device`` walks the tree with recursive rejection sampling
   without replacement and draws the next token from the residual at the last
   accepted node, on the device; one host synchronisation reads back the last
   accepted node, the next token and the node tokens (no n x V copy);
4. commit the accepted path; the next tree's candidates are drawn (on the device,
   Gumbel-top-k with a key from the generation's generator) from the streams'
   processed distributions at the last accepted node.

The adaptive pause samples its plain passes from the target's own law, so the output
law is unchanged.  A context branch (prompt lookup, the draft corpus) joins the tree as
in greedy decoding; each node on it tests the branch's token before the streams'
candidates (``rejection_tables``' ``fixed``).

No pruning when sampling: pruning keeps a child only if the early-exit probability
of its token is high, so the surviving children are no longer draws from ``q``
without replacement and the acceptance rule would no longer be exact.

With temp == 0 and a repetition penalty the loop is greedy on the penalised logits
(``accept_greedy``, exact match).  ``sampled_autoregressive_steps`` samples one token
per pass in the same runtime: it is the reference distribution.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import mlx.core as mx
import numpy as np

from .decode import (
    DecodeStats,
    GreedyAcceptor,
    autoregressive_steps,
    default_tree,
    speculative_loop,
    with_context_branch,
)
from .drafting import Draft, Proposals, StreamDrafter, topk_indices
from .model import SpecStreamModel
from .sampling import (
    SamplingParams,
    branch_children,
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


def rejection_tables(tree: Tree, streams: int | None = None,
                     branch: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Per child slot (the stream children of each node, ids below ``streams``, in rank
    order), for every node: the child (-1: none), the proposal row of its depth and its
    rank; ``fixed``: each node's child on the deterministic ``branch`` (-1: none)."""
    n = tree.size
    streams = n if streams is None else streams
    kids = [sorted((c for c in tree.children[u] if c < streams), key=lambda c: int(tree.rank[c]))
            for u in range(n)]
    slots = max(len(k) for k in kids)
    child = -np.ones((slots, n), dtype=np.int32)
    for u, k in enumerate(kids):
        child[: len(k), u] = k
    has = child >= 0
    row = np.where(has, tree.depth[None, :], 0).astype(np.int32)
    rank = np.where(has, tree.rank[np.maximum(child, 0)], 0).astype(np.int32)
    return {"child": child, "row": row, "rank": rank,
            "fixed": branch_children(n, branch)}


def accept_sampled_on_device(tree: Tree, tables: dict[str, np.ndarray], tokens: mx.array,
                             p: mx.array, q: mx.array | None, cands: mx.array | None,
                             key: mx.array) -> mx.array:
    """``sampling.accept_sampled`` on the device: int32 (last accepted node, next token).

    Every node runs the rejection test over its children at once (its branch child
    first, then one stream-child slot at a time, all nodes in parallel), each test with
    its own uniform draw; the accepted
    path then follows each node's accepted child from the root, and the next token is
    a draw (Gumbel-max) from the residual at its last node.  The host reads two
    integers instead of n x V targets.  Same law as the host walk: every decision on
    the path uses the same quantities and a fresh uniform (in float32 where the host
    uses float64)."""
    n = tree.size
    r = p.astype(mx.float32)
    r = r / r.sum(axis=-1, keepdims=True)
    k_test, k_next = mx.random.split(key)
    child = tables["child"]
    acc = mx.full((n,), -1, dtype=mx.int32)
    active = mx.ones((n,), dtype=mx.bool_)
    fixed = tables["fixed"]
    if (fixed >= 0).any():  # the branch child: a proposal of all its mass on one token
        k_test, k_fixed = mx.random.split(k_test)
        has = mx.array(fixed >= 0)
        kid = mx.array(np.maximum(fixed, 0))
        ry = mx.take_along_axis(r, tokens[kid].astype(mx.int32)[:, None], axis=-1)[:, 0]
        take = has & (mx.random.uniform(shape=(n,), key=k_fixed) < ry)
        acc = mx.where(take, kid, acc)
        active = ~take
        y_hot = mx.arange(r.shape[-1]) == tokens[kid].astype(mx.int32)[:, None]
        rest = mx.where(y_hot, 0.0, r)
        total = rest.sum(axis=-1, keepdims=True)
        rest = rest / mx.where(total > 0, total, 1.0)
        r = mx.where((has & ~take & (total[:, 0] > 0))[:, None], rest, r)
    if child.shape[0]:
        q32 = q.astype(mx.float32)
        V = q32.shape[-1]
        drawn = (cands[..., None] == mx.arange(V)).astype(mx.int32)  # (rows, kmax, V)
        before = (mx.cumsum(drawn, axis=1) - drawn) > 0  # drawn at a lower rank
        uniforms = mx.random.uniform(shape=(child.shape[0], n), key=k_test)
        for slot in range(child.shape[0]):
            has = mx.array(child[slot] >= 0)
            kid = mx.array(np.maximum(child[slot], 0))
            row, rank = mx.array(tables["row"][slot]), mx.array(tables["rank"][slot])
            qd = mx.where(before[row, rank], 0.0, q32[row])  # earlier candidates removed
            mass = qd.sum(axis=-1)
            live = active & has & (mass > 0)
            active = active & ~(has & ~(mass > 0))  # only padding left: stop here
            x = tokens[kid].astype(mx.int32)[:, None]
            safe_mass = mx.where(mass > 0, mass, 1.0)
            qx = mx.take_along_axis(qd, x, axis=-1)[:, 0] / safe_mass
            genuine = live & (qx > 0)  # a zero-mass candidate is padding: skipped
            take = genuine & (uniforms[slot] * qx < mx.take_along_axis(r, x, axis=-1)[:, 0])
            acc = mx.where(take, kid, acc)
            active = active & ~take
            rest = mx.maximum(r - qd / safe_mass[:, None], 0.0)
            total = rest.sum(axis=-1, keepdims=True)
            rest = mx.where(total > 0, rest / mx.where(total > 0, total, 1.0), r)
            r = mx.where((genuine & ~take)[:, None], rest, r)
    node = mx.array(0, dtype=mx.int32)
    if tree.size > 1:
        for _ in range(tree.max_depth):
            nxt = acc[node]
            node = mx.where(nxt >= 0, nxt, node)
    residual = r[node]
    nxt_token = mx.argmax(mx.log(residual) + mx.random.gumbel(residual.shape, key=k_next))
    return mx.stack([node, nxt_token.astype(mx.int32)])


class SampledAcceptor(GreedyAcceptor):
    """Recursive rejection sampling over the tree (``accept_sampled_on_device``), each
    node's target seeing its own history; greedy on the processed logits when
    temp == 0."""

    def __init__(self, params: SamplingParams, rng: np.random.Generator) -> None:
        super().__init__()
        self.params, self.rng = params, rng
        self.ancestry: dict[int, tuple[Tree, list[mx.array]]] = {}
        self.rejection: dict[tuple, tuple[Tree, dict[str, np.ndarray]]] = {}

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

    def decide(self, tree: Tree, tokens: mx.array, targets: mx.array,
               draft: Draft | None) -> mx.array:
        if self.params.greedy:
            return super().decide(tree, tokens, targets, draft)
        streams, branch = (tree.size, ()) if draft is None else (draft.streams, draft.branch)
        key = (id(tree), streams, tuple(branch))
        if key not in self.rejection:
            if len(self.rejection) >= 256:  # branched trees vary: keep the table bounded
                self.rejection.clear()
            self.rejection[key] = (tree, rejection_tables(tree, streams, branch))
        q, cands = (None, None) if draft is None else (draft.q, draft.cands)
        return accept_sampled_on_device(tree, self.rejection[key][1], tokens, targets,
                                        q, cands, random_key(self.rng))


def sampled_speculative_steps(
    model: SpecStreamModel,
    prompt: mx.array,
    max_tokens: int,
    stats: DecodeStats,
    params: SamplingParams,
    tree: Tree | None = None,
    lookup_branches: int | None = None,
    lookup_skip_streams: int | None = None,
    lookup_corpus: bool | None = None,
) -> Iterator[int]:
    """Speculative Streaming with sampling.  Yields tokens whose joint law is that of
    ``sampled_autoregressive_steps`` (for temp == 0: its exact tokens).

    The context branch (``decode.with_context_branch``; default: the folder's
    ``lookup_branches``, ``lookup_skip_streams`` and ``lookup_corpus``) joins the tree as
    in greedy decoding; its tokens are a function of the context, so the acceptor tests
    them as one-token proposals (``sampling.accept_sampled``)."""
    cfg = model.cfg
    tree = tree if tree is not None else default_tree(cfg)
    if tree.max_depth > cfg.num_streams:
        raise ValueError(f"tree depth {tree.max_depth} exceeds {cfg.num_streams} streams")
    rng = params.make_rng()
    drafter = with_context_branch(model, StreamDrafter(tree, sampled_proposals(params, rng)),
                                  lookup_branches, lookup_skip_streams, lookup_corpus)
    if drafter.max_depth == 0:  # nothing to draft: plain sampling is the fastest
        yield from sampled_autoregressive_steps(model, prompt, max_tokens, stats, params)
        return
    yield from speculative_loop(model, prompt, max_tokens, stats, drafter,
                                SampledAcceptor(params, rng))
