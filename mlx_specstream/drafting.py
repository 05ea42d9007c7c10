"""Drafters propose what the next pass verifies from the previous pass's outputs.

``observe(stream_logits, context)`` receives the ``rows`` stream logits of the last
accepted node (lazy: their LM head runs inside the next pass) on passes that ran the
streams, ``skip()`` is told of a pass that ran without them (``stale``: nothing to draft
from until the next that runs them); ``propose(context, room, paused)`` returns the
``Draft`` (root: ``context[-1]``) of at most ``room`` nodes, or None when the root does
not fit; ``paused``: no stream nodes this pass (the adaptive pause, or stale streams).
``StreamDrafter``: the speculative streams (Medusa heads fill the same slots), one tree or
a chain sized per step.  ``ContextDrafter``: a prompt-lookup branch under another
drafter's tree (where the context has no match, from a corpus of the model's past
answers); over the root alone it is plain prompt lookup.  A long branch (``skip_at``
tokens or more) marks its pass ``skip_streams``: the text is being copied, the next pass
is likely drafted by the context again, and the pass saves the stream rows of every node.
Otherwise, a branch that goes past the stream tree by two nodes or more lists in
``stream_nodes`` the nodes whose streams the pass runs: the tree's and the branch's end
(a path that stops inside the branch leaves the next pass without stream drafts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from .tree import Tree, follow_chain, product_tree, with_chain

if TYPE_CHECKING:
    from .corpus import DraftCorpus

ROOT = product_tree([])


@dataclass
class Draft:
    """The nodes one pass verifies.  The first ``streams`` nodes (root included) come
    from the streams, the rest from the context branch; ``branch``: the nodes on the
    context branch, shared stream nodes included (pruning keeps them)."""

    tree: Tree
    tokens: mx.array  # (n,) int32, node 0 is the root
    depth: mx.array  # (n,) int32 on the device: position offsets of the nodes
    mask: mx.array | None  # (n, n) bool, None for the root alone
    parent: mx.array  # (n,) int32, the root its own parent
    streams: int
    branch: list[int] = field(default_factory=list)
    q: mx.array | None = None  # the streams' proposals, for exact sampling
    cands: mx.array | None = None  # (rows, kmax) candidates in draw order
    skip_streams: bool = False  # this pass need not run the streams (a long context branch)
    stream_nodes: list[int] | None = None  # the nodes whose streams the pass runs (None: all)


def topk_indices(logits: mx.array, k: int) -> mx.array:
    """Indices of the k largest entries along the last axis, best first."""
    if k == 1:
        return mx.argmax(logits, axis=-1, keepdims=True)
    part = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
    vals = mx.take_along_axis(logits, part, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    return mx.take_along_axis(part, order, axis=-1)


def top_candidates(stream_logits: mx.array, context: list[int], kmax: int
                   ) -> tuple[None, mx.array]:
    """Greedy proposals: the streams' top-kmax tokens (no proposal distribution)."""
    return None, topk_indices(stream_logits, kmax)


def monotone_costs(costs: Sequence[float] | None) -> Callable[[int], float]:
    """Relative cost of a pass of n nodes from the measured ``cfg.tree_costs`` (noisy:
    made monotone), or a rough CPU-like default when uncalibrated."""
    c = list(costs or [])
    for i in range(len(c) - 2, -1, -1):
        c[i] = min(c[i], c[i + 1])

    def pass_cost(n: int) -> float:
        if not c:
            return 1.2 + 0.2 * (n - 1)
        return c[n - 1] if n <= len(c) else c[-1] * n / len(c)

    return pass_cost


def chain_length(conf: np.ndarray, pass_cost: Callable[[int], float]) -> int:
    """The chain length d maximising (1 + p_1 + p_1 p_2 + ...) / cost(d + 1 nodes) for
    the streams' top-1 probabilities ``conf`` (EAGLE-2's idea restricted to chains)."""
    best, best_d, reach, expect = 0.0, 0, 1.0, 1.0
    for d in range(len(conf) + 1):
        if d:
            reach *= float(conf[d - 1])
            expect += reach
        value = expect / pass_cost(d + 1)
        if value > best:
            best, best_d = value, d
    return best_d


def on_device(tree: Tree, made: dict[int, tuple]) -> tuple:
    """(depth, mask or None, parent, gather index) of ``tree`` on the device, made once
    per tree and kept in ``made``."""
    if id(tree) not in made:
        made[id(tree)] = (tree, mx.array(tree.depth.astype(np.int32)),
                          mx.array(tree.mask) if tree.size > 1 else None,
                          mx.array(np.maximum(tree.parent, 0).astype(np.int32)),
                          mx.array(tree.gather_index.astype(np.int32)))
    return made[id(tree)][1:]


Proposals = Callable[[mx.array, list[int], int], tuple[mx.array | None, mx.array]]


class StreamDrafter:
    """The tree under the root, its depth-d nodes drawn from stream d of the last
    accepted node.  ``proposals(stream_logits, context, kmax)`` gives the candidates
    (and, for exact sampling, the proposal distributions); ``chains``: instead of one
    tree, the chains of 0 .. g nodes, one chosen per step by ``chain_length`` from the
    streams' confidences (one extra host sync per step)."""

    def __init__(self, tree: Tree, proposals: Proposals = top_candidates,
                 chains: list[Tree] | None = None,
                 pass_cost: Callable[[int], float] | None = None) -> None:
        self.tree = chains[-1] if chains else tree
        self.chains = chains
        self.pass_cost = pass_cost or monotone_costs(None)
        self.proposals = proposals
        self.rows = self.tree.max_depth  # streams read: stream d drafts depth d
        self.max_depth = self.tree.max_depth
        self.uses_streams = self.tree.size > 1
        self.made: dict[int, tuple] = {}
        self.q = self.cands = self.conf = None
        self.stale = False  # the last pass ran without the streams

    def observe(self, stream_logits: mx.array, context: list[int]) -> None:
        self.stale = False
        self.q, self.cands = self.proposals(stream_logits, context, self.tree.kmax)
        if self.chains:  # float32 on the device: the host reads it (numpy has no bfloat16)
            sl = stream_logits.astype(mx.float32)
            self.conf = mx.exp(mx.max(sl, axis=-1) - mx.logsumexp(sl, axis=-1))

    def skip(self) -> None:
        self.stale = True
        self.q = self.cands = self.conf = None

    def propose(self, context: list[int], room: int, paused: bool) -> Draft | None:
        if paused or self.stale:
            tree = ROOT
        elif self.chains:
            tree = self.chains[chain_length(np.array(self.conf), self.pass_cost)]
        else:
            tree = self.tree
        if tree.size > room:
            return None
        depth, mask, parent, gather = on_device(tree, self.made)
        tokens = mx.array(context[-1:], dtype=mx.int32)
        if tree.size > 1:
            tokens = mx.concatenate([tokens, self.cands.reshape(-1)[gather].astype(mx.int32)])
        return Draft(tree, tokens, depth, mask, parent, streams=tree.size, q=self.q,
                     cands=self.cands)


class ContextDrafter:
    """Prompt lookup on top of ``base``: when the context (root included) ends with an
    n-gram (``max_ngram`` down to ``min_ngram`` tokens) seen earlier, the tokens that
    followed it (at most ``max_len``) join the base draft as a chain from the root.  The
    chain follows the base tree's nodes as long as they carry its tokens and continues
    as new nodes (any depth) below the last of them, so no two siblings repeat a token;
    reading the base nodes' tokens for that costs one host sync on steps with a match.
    During the pause the base draft is the root alone, so the branch is verified alone.
    ``skip_at`` > 0: a chain of at least that many tokens marks the draft ``skip_streams``.
    ``corpus`` (``corpus.DraftCorpus``): where the context has no match, the chain is the
    corpus's continuation of the context's suffix, if it has one."""

    def __init__(self, base: StreamDrafter, max_len: int, max_ngram: int = 3,
                 min_ngram: int = 1, skip_at: int = 0, corpus: DraftCorpus | None = None
                 ) -> None:
        self.base = base
        self.corpus = corpus
        self.max_len, self.max_ngram, self.min_ngram = max_len, max_ngram, min_ngram
        self.skip_at = skip_at
        self.rows, self.uses_streams = base.rows, base.uses_streams
        self.max_depth = base.max_depth or max_len
        self.made = base.made
        self.branched: dict[tuple[int, int, int], Tree] = {}

    def observe(self, stream_logits: mx.array, context: list[int]) -> None:
        self.base.observe(stream_logits, context)

    def skip(self) -> None:
        self.base.skip()

    @property
    def stale(self) -> bool:
        return self.base.stale

    def propose(self, context: list[int], room: int, paused: bool) -> Draft | None:
        draft = self.base.propose(context, room, paused)
        if draft is None:
            return draft
        chain = find_draft(context, self.max_ngram, self.max_len, self.min_ngram)
        if not chain and self.corpus is not None:
            chain = self.corpus.lookup(context, self.max_len)
        if not chain:
            return draft
        draft.skip_streams = 0 < self.skip_at <= len(chain)
        base = draft.tree
        on_branch = [0]
        if base.size > 1:
            on_branch = follow_chain(base, np.array(draft.tokens), chain)
        draft.branch = on_branch
        new = min(len(chain) - len(on_branch) + 1, room - base.size)
        if new <= 0:
            return draft
        key = (id(base), on_branch[-1], new)
        if key not in self.branched:
            self.branched[key] = with_chain(base, on_branch[-1], new)
        tree = self.branched[key]
        tail = chain[len(on_branch) - 1 : len(on_branch) - 1 + new]
        draft.tree = tree
        draft.tokens = mx.concatenate([draft.tokens, mx.array(tail, dtype=mx.int32)])
        draft.depth, draft.mask, draft.parent, _ = on_device(tree, self.made)
        draft.branch = on_branch + list(range(base.size, tree.size))
        if new > 1:  # inside the new part of the branch only its end may need them
            draft.stream_nodes = list(range(base.size)) + [tree.size - 1]
        return draft


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
