"""Draft trees as pure array code: shape, flattening, pruning, greedy acceptance.

A node at depth d >= 1 carries the token of rank ``rank`` among the top-k of stream d
at the host position (the last accepted token); the root (node 0, depth 0) is the
token the main stream already chose.  In the paper's *product* tree every depth-d
node has the same ``k_{d+1}`` children.  Nodes are stored breadth first, so parents
come before children and a tree keeps that order under pruning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Tree:
    parent: np.ndarray  # (n,) int, -1 for the root
    depth: np.ndarray  # (n,) int, 0 for the root
    rank: np.ndarray  # (n,) int, rank of the node's token among its stream's top-k
    kmax: int  # number of candidates per stream the tree draws from
    children: tuple[tuple[int, ...], ...] = field(repr=False)
    mask: np.ndarray = field(repr=False)  # (n, n) bool: node i sees node j (ancestor or self)

    @property
    def size(self) -> int:
        return int(self.parent.shape[0])

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @property
    def gather_index(self) -> np.ndarray:
        """For nodes 1..n-1: index into the flattened (num_streams, kmax) candidates."""
        return (self.depth[1:] - 1) * self.kmax + self.rank[1:]


def make_tree(parent: Sequence[int], depth: Sequence[int], rank: Sequence[int]) -> Tree:
    parent_a = np.asarray(parent, dtype=np.int64)
    depth_a = np.asarray(depth, dtype=np.int64)
    rank_a = np.asarray(rank, dtype=np.int64)
    n = parent_a.shape[0]
    if n == 0 or parent_a[0] != -1 or depth_a[0] != 0:
        raise ValueError("node 0 must be the root (parent -1, depth 0)")
    children: list[list[int]] = [[] for _ in range(n)]
    mask = np.zeros((n, n), dtype=bool)
    mask[0, 0] = True
    for i in range(1, n):
        p = int(parent_a[i])
        if not 0 <= p < i:
            raise ValueError(f"node {i}: parent {p} must come before it")
        if depth_a[i] != depth_a[p] + 1:
            raise ValueError(f"node {i}: depth {depth_a[i]} is not its parent's + 1")
        children[p].append(i)
        mask[i] = mask[p]
        mask[i, i] = True
    kmax = int(rank_a.max()) + 1 if n > 1 else 1
    return Tree(
        parent=parent_a,
        depth=depth_a,
        rank=rank_a,
        kmax=kmax,
        children=tuple(tuple(c) for c in children),
        mask=mask,
    )


def product_tree(topk: Sequence[int]) -> Tree:
    """The paper's tree: top-k_d of stream d under every depth-(d-1) node.

    Size 1 + k1 + k1*k2 + ...; ``topk=[]`` gives the root alone (autoregressive)."""
    parent, depth, rank = [-1], [0], [0]
    frontier = [0]
    for d, k in enumerate(topk, start=1):
        nxt = []
        for p in frontier:
            for r in range(int(k)):
                parent.append(p)
                depth.append(d)
                rank.append(r)
                nxt.append(len(parent) - 1)
        frontier = nxt
    return make_tree(parent, depth, rank)


def subtree(tree: Tree, keep: np.ndarray) -> Tree:
    """The tree restricted to ``keep`` (sorted node ids, closed under ancestors)."""
    keep = np.asarray(keep, dtype=np.int64)
    remap = -np.ones(tree.size, dtype=np.int64)
    remap[keep] = np.arange(keep.shape[0])
    parent = np.where(tree.parent[keep] >= 0, remap[tree.parent[keep]], -1)
    t = make_tree(parent, tree.depth[keep], tree.rank[keep])
    return Tree(t.parent, t.depth, t.rank, tree.kmax, t.children, t.mask)


def prune(tree: Tree, child_prob: np.ndarray, threshold: float) -> np.ndarray:
    """Node ids kept by parallel pruning: a node survives if its early-exit probability
    (of its token given its parent) is >= threshold and its parent survives.

    child_prob: (n,) probabilities; entry 0 (the root) is ignored."""
    n = tree.size
    keep = np.zeros(n, dtype=bool)
    keep[0] = True
    if threshold <= 0.0:
        keep[:] = True
    else:
        for i in range(1, n):
            keep[i] = keep[tree.parent[i]] and child_prob[i] >= threshold
    return np.nonzero(keep)[0]


def accept_greedy(tree: Tree, tokens: np.ndarray, predicted: np.ndarray) -> list[int]:
    """Longest root-to-leaf path whose every step matches the main stream's argmax.

    tokens[i]: the token at node i; predicted[i]: the main stream's argmax after node i.
    Returns the node ids of the accepted path, starting with the root."""
    path = [0]
    cur = 0
    while True:
        want = predicted[cur]
        nxt = -1
        for c in tree.children[cur]:
            if tokens[c] == want:
                nxt = c
                break
        if nxt < 0:
            return path
        path.append(nxt)
        cur = nxt


def tree_from_paths(paths: Sequence[Sequence[int]]) -> Tree:
    """A tree from rank paths: (r1, ..., rd) is the node reached by taking stream 1's
    rank-r1 candidate, then stream 2's rank-r2 candidate, ...  Every prefix of a path
    must be a path too (the root, (), is implicit)."""
    uniq = sorted({tuple(int(r) for r in p) for p in paths if len(p) > 0},
                  key=lambda p: (len(p), p))
    index: dict[tuple[int, ...], int] = {(): 0}
    parent, depth, rank = [-1], [0], [0]
    for p in uniq:
        if p[:-1] not in index:
            raise ValueError(f"path {list(p)} has no parent path {list(p[:-1])}")
        index[p] = len(parent)
        parent.append(index[p[:-1]])
        depth.append(len(p))
        rank.append(p[-1])
    return make_tree(parent, depth, rank)


def tree_paths(tree: Tree) -> list[list[int]]:
    """The rank paths of a tree's nodes (root excluded), the inverse of tree_from_paths."""
    paths: list[list[int]] = [[]]
    for i in range(1, tree.size):
        paths.append(paths[int(tree.parent[i])] + [int(tree.rank[i])])
    return paths[1:]


def best_paths(path_prob: dict[tuple[int, ...], float], size: int) -> list[tuple[int, ...]]:
    """The ``size - 1`` rank paths of highest acceptance probability.

    The expected number of accepted drafts of a tree is the sum over its nodes of the
    probability that the node's whole path is right; a path is never more probable
    than its prefix, so the top paths are closed under prefixes (ties broken by
    length) and form the best tree of that size."""
    ranked = sorted(path_prob.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))
    chosen: list[tuple[int, ...]] = []
    have: set[tuple[int, ...]] = {()}
    for p, _ in ranked:
        if len(chosen) >= size - 1:
            break
        if p[:-1] in have:
            chosen.append(p)
            have.add(p)
    return chosen


def follow_chain(tree: Tree, tokens: np.ndarray, chain: Sequence[int]) -> list[int]:
    """The nodes reached by walking ``chain`` down ``tree`` from the root while a child
    carries the chain's next token (the root first; ``tokens[i]``: node i's token).
    ``chain[len(result) - 1:]`` is the part of the chain the tree does not hold."""
    path = [0]
    for t in chain:
        nxt = next((c for c in tree.children[path[-1]] if tokens[c] == t), -1)
        if nxt < 0:
            break
        path.append(nxt)
    return path


def with_chain(tree: Tree, attach: int, length: int) -> Tree:
    """``tree`` with a chain of ``length`` new nodes hanging from node ``attach``.

    The new nodes come after the tree's own (ids ``tree.size ..``), so parents still
    precede children and node ids of ``tree`` are unchanged; their depths continue the
    attach node's and may exceed the streams'.  They carry no stream candidate: their
    rank is 0 and ``kmax`` stays the tree's, so ``tree.gather_index`` (not the result's)
    indexes the candidates of the first ``tree.size`` nodes."""
    if length < 1:
        return tree
    if not 0 <= attach < tree.size:
        raise ValueError(f"attach node {attach} is not in a tree of {tree.size} nodes")
    n = tree.size
    parent = np.concatenate([tree.parent, [attach], np.arange(n, n + length - 1)])
    depth = np.concatenate([tree.depth, tree.depth[attach] + np.arange(1, length + 1)])
    rank = np.concatenate([tree.rank, np.zeros(length, dtype=np.int64)])
    t = make_tree(parent, depth, rank)
    return Tree(t.parent, t.depth, t.rank, tree.kmax, t.children, t.mask)


def parse_tree_shape(text: str | Sequence[str]) -> list[int]:
    """Candidates per depth from ``"3,2,1"``, ``"3 2 1"`` or ``["3", "2", "1"]``.

    Raises ValueError unless every value is an integer >= 1 and there is at least one."""
    parts = [text] if isinstance(text, str) else list(text)
    values = []
    for part in parts:
        for v in part.replace(",", " ").split():
            try:
                values.append(int(v))
            except ValueError:
                raise ValueError(
                    f"expected integers >= 1 separated by commas or spaces, got {part!r}"
                ) from None
    if not values or any(k < 1 for k in values):
        raise ValueError(f"expected integers >= 1 separated by commas or spaces, got {text!r}")
    return values


def add_tree_topk_argument(
    parser, default=None, help: str | None = None, several: bool = True
) -> None:
    """``--tree-topk`` taking ``3,2,1``, ``"3 2 1"`` or (``several``: for commands without
    positional arguments) ``3 2 1``; the parsed value is a list of ints, or ``default``."""
    import argparse

    class _TreeShape(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            try:
                setattr(namespace, self.dest, parse_tree_shape(values))
            except ValueError as e:
                parser.error(f"{option_string}: {e}")

    parser.add_argument(
        "--tree-topk",
        nargs="+" if several else None,
        action=_TreeShape,
        default=default,
        metavar="K",
        help=help or "candidates per depth of the draft tree, e.g. 3,2,1 or 3 2 1",
    )
