"""Acceptance and pruning decided on the device: the same decisions as the host
functions of tree.py (greedy, pruning) and the same law as sampling.accept_sampled."""

from __future__ import annotations

from collections import Counter

from mlx_specstream.decode import TreeTables, accepted_node_greedy, kept_by_pruning, path_to
from mlx_specstream.sampled import accept_sampled_on_device, rejection_tables
from mlx_specstream.sampling import draft, random_key
from mlx_specstream.tree import accept_greedy, make_tree, product_tree, prune

import mlx.core as mx
import numpy as np
import pytest
from test_sampling import (
    ALPHA,
    PROPOSALS,
    V,
    exact_law,
    goodness_of_fit,
    p_next,
    simulate_branched,
)

TREES = [
    product_tree([3, 2, 1]),
    product_tree([1, 1, 1]),
    make_tree([-1, 0, 0, 1, 2], [0, 1, 1, 2, 2], [0, 0, 2, 0, 1]),  # ranks skipped
    make_tree([-1, 0, 0, 0, 1, 1, 4], [0, 1, 1, 1, 2, 2, 3], [0, 0, 1, 2, 0, 1, 0]),
]


@pytest.mark.parametrize("tree", TREES)
def test_greedy_acceptance_on_the_device_is_accept_greedy(tree) -> None:
    """Random tokens over 3 symbols: siblings often carry the same token (the first
    match wins, as on the host) and paths of every length occur."""
    rng = np.random.default_rng(0)
    tables = TreeTables()
    lengths = Counter()
    for _ in range(300):
        tokens = rng.integers(0, 3, tree.size)
        pred = rng.integers(0, 3, tree.size)
        want = accept_greedy(tree, tokens, pred)
        best = accepted_node_greedy(mx.array(tokens), mx.array(pred), tables.get(tree))
        assert path_to(tree, int(best.item())) == want
        lengths[len(want)] += 1
    assert len(lengths) == tree.max_depth + 1


@pytest.mark.parametrize("tree", TREES)
def test_pruning_on_the_device_is_prune(tree) -> None:
    rng = np.random.default_rng(1)
    for _ in range(100):
        p = rng.random(tree.size).astype(np.float32)
        branch = sorted({0, *rng.choice(tree.size, 2).tolist()})
        host = p.copy()
        host[branch] = 1.0
        want = prune(tree, host, 0.5)
        kept = kept_by_pruning(mx.array(p), mx.array(tree.mask), branch, 0.5)
        assert np.nonzero(np.array(kept))[0].tolist() == want.tolist()


def _device_accept(tree, tables, tokens, p, q, cands, rng) -> tuple[list[int], int]:
    out = accept_sampled_on_device(tree, tables, mx.array(tokens), mx.array(p, mx.float32),
                                   mx.array(q, mx.float32), mx.array(cands), random_key(rng))
    node, nxt = np.array(out).tolist()
    return path_to(tree, node), nxt


def _simulate(tree, topk: list[int], n_out: int, rng) -> tuple[int, ...]:
    """test_sampling.simulate with the device acceptance."""
    tables = rejection_tables(tree)
    seq, out = [2, 4], []
    ancestry = []
    for i in range(tree.size):
        par = int(tree.parent[i])
        ancestry.append((ancestry[par] if par >= 0 else []) + [i])
    while len(out) < n_out:
        q = np.stack([PROPOSALS[d][seq[-1]] for d in range(tree.max_depth)])
        cands, _ = draft(q, topk, rng)
        tokens = np.array(
            [seq[-1]] + [cands[tree.depth[i] - 1, tree.rank[i]] for i in range(1, tree.size)]
        )
        p = np.stack([p_next(seq + [int(tokens[j]) for j in a[1:]]) for a in ancestry])
        path, nxt = _device_accept(tree, tables, tokens, p, q, cands, rng)
        emitted = [int(tokens[i]) for i in path[1:]] + [nxt]
        seq += emitted
        out += emitted
    return tuple(out[:n_out])


@pytest.mark.parametrize(
    "tree,topk",
    [
        (product_tree([3, 2, 1]), [3, 2, 1]),
        (make_tree([-1, 0, 0, 1, 2], [0, 1, 1, 2, 2], [0, 0, 2, 0, 1]), [3, 2]),
    ],
)
def test_device_rejection_sampling_emits_the_target_distribution(tree, topk) -> None:
    """The synthetic decode loop of test_sampling with the device acceptance: the first
    two emitted tokens follow the target's joint law (goodness of fit, 3000 runs)."""
    rng = np.random.default_rng(7)
    runs = [_simulate(tree, topk, 2, rng) for _ in range(3000)]
    stat1, df1, p1 = goodness_of_fit(Counter(r[0] for r in runs),
                                     {k[0]: v for k, v in exact_law(1).items()})
    stat2, df2, p2 = goodness_of_fit(Counter(runs), exact_law(2))
    assert p1 > ALPHA, (stat1, df1)
    assert p2 > ALPHA, (stat2, df2)


def _device_accept_branched(tree, tokens, p, q, rng, cands, streams, branch):
    return _device_accept(tree, rejection_tables(tree, streams, branch), tokens, p, q,
                          cands, rng)


@pytest.mark.parametrize("base,topk", [(product_tree([3, 2]), [3, 2]),
                                       (product_tree([]), [])])
def test_device_rejection_with_a_deterministic_branch_keeps_the_law(base, topk) -> None:
    """test_sampling's branched decode loop with the device acceptance (3000 runs)."""
    rng = np.random.default_rng(8)
    runs = [simulate_branched(base, topk, 2, rng, _device_accept_branched)
            for _ in range(3000)]
    stat, df, pval = goodness_of_fit(Counter(runs), exact_law(2))
    assert pval > ALPHA, (stat, df)


def test_device_rejection_takes_the_whole_chain_when_streams_are_exact() -> None:
    tree = product_tree([2, 2])
    tokens = np.array([0, 1, 2, 3, 4, 3, 4])
    p = np.zeros((7, V))
    p[0, 1] = p[1, 3] = 1.0  # the target is deterministic: 1 then 3 then 5
    p[3, 5] = 1.0
    p[[2, 4, 5, 6], 0] = 1.0
    q = np.zeros((2, V))
    q[0, [1, 2]] = [0.9, 0.1]
    q[1, [3, 4]] = [0.6, 0.4]
    cands = np.array([[1, 2], [3, 4]])
    tables = rejection_tables(tree)
    for s in range(20):
        rng = np.random.default_rng(s)
        assert _device_accept(tree, tables, tokens, p, q, cands, rng) == ([0, 1, 3], 5)


def test_device_rejection_never_accepts_padding_or_zero_target() -> None:
    tree = product_tree([3])
    q = np.zeros((1, V))
    q[0, [1, 5]] = [0.5, 0.5]  # two tokens of mass for three candidates: rank 2 is padding
    tokens = np.array([0, 5, 1, 0])  # padding carries token 0, which the target loves
    cands = np.array([[5, 1, 0]])
    p = np.zeros((4, V))
    p[0, [0, 1]] = [0.9, 0.1]
    p[1:, 2] = 1.0
    tables = rejection_tables(tree)
    for s in range(100):
        rng = np.random.default_rng(s)
        # token 5: p = 0; token 1: no residual mass; node 3: padding; residual keeps 0
        assert _device_accept(tree, tables, tokens, p, q, cands, rng) == ([0], 0)
