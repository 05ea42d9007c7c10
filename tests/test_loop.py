"""The phases of the speculative loop alone: drafters on hand-made stream logits and
contexts, acceptors on hand-made trees, verify + commit on a fake model."""

from __future__ import annotations

from types import SimpleNamespace

from mlx_specstream.cache import TreeKVCache
from mlx_specstream.decode import GreedyAcceptor, commit, prefill, verify
from mlx_specstream.drafting import (
    ROOT,
    ContextDrafter,
    StreamDrafter,
    chain_length,
    monotone_costs,
)
from mlx_specstream.sampled import SampledAcceptor, sampled_proposals
from mlx_specstream.sampling import SamplingParams
from mlx_specstream.tree import product_tree, tree_from_paths

import mlx.core as mx
import numpy as np
from test_decode import PROMPT, FakeModel, succ

V = 16


def logits_ranking(*rows: list[int]) -> mx.array:
    """Stream logits (one row per stream) ranking the given tokens first, in order."""
    out = np.zeros((len(rows), V), np.float32)
    for r, toks in enumerate(rows):
        for rank, t in enumerate(toks):
            out[r, t] = 10.0 - rank
    return mx.array(out)


def test_stream_drafter_proposes_the_streams_top_candidates() -> None:
    drafter = StreamDrafter(product_tree([2, 1]))  # root, 2 at depth 1, 1 under each
    assert drafter.rows == 2 and drafter.uses_streams
    drafter.observe(logits_ranking([5, 6], [9, 8]), [1, 2, 7])
    draft = drafter.propose([1, 2, 7], room=10, paused=False)
    assert draft.tree is drafter.tree and draft.streams == 5 and draft.branch == []
    assert draft.tokens.tolist() == [7, 5, 6, 9, 9]
    assert draft.depth.tolist() == [0, 1, 1, 2, 2] and draft.mask.shape == (5, 5)
    paused = drafter.propose([1, 2, 7], room=10, paused=True)
    assert paused.tree.size == 1 and paused.tokens.tolist() == [7] and paused.mask is None
    assert drafter.propose([1, 2, 7], room=4, paused=False) is None  # 5 nodes do not fit
    assert drafter.propose([1, 2, 7], room=0, paused=True) is None


def test_dynamic_chain_follows_confidence_and_costs() -> None:
    free, steep = monotone_costs([1.0, 1.0, 1.0, 1.0]), monotone_costs([1.0, 50.0, 100.0])
    assert chain_length(np.array([0.9, 0.9, 0.9]), free) == 3
    assert chain_length(np.array([0.9, 0.9, 0.9]), steep) == 0
    assert monotone_costs([1.0, 2.0, 1.5])(2) == 1.5  # noisy measurements made monotone
    assert monotone_costs(None)(3) == 1.2 + 0.2 * 2  # uncalibrated default
    chains = [tree_from_paths([[0] * i for i in range(1, d + 1)]) for d in range(4)]
    drafter = StreamDrafter(chains[-1], chains=chains,
                            pass_cost=monotone_costs([1.0, 1.0, 1.0, 3.0]))
    sure, unsure = np.full(V, -30.0, np.float32), np.zeros(V, np.float32)
    sure[4] = 30.0
    drafter.observe(mx.array(np.stack([sure, sure, unsure])), [3])
    draft = drafter.propose([3], room=10, paused=False)  # the unsure third node costs more
    assert draft.tree is chains[2] and draft.tokens.tolist() == [3, 4, 4]


def test_context_drafter_alone_is_prompt_lookup() -> None:
    drafter = ContextDrafter(StreamDrafter(ROOT), max_len=3, max_ngram=2)
    assert not drafter.uses_streams and drafter.max_depth == 3
    context = [1, 2, 3, 9, 1, 2]
    draft = drafter.propose(context, room=10, paused=False)
    assert draft.tokens.tolist() == [2, 3, 9, 1]
    assert draft.tree.parent.tolist() == [-1, 0, 1, 2] and draft.streams == 1
    assert draft.branch == [0, 1, 2, 3]
    short = drafter.propose(context, room=3, paused=False)  # the chain's head fits
    assert short.tokens.tolist() == [2, 3, 9]
    none = drafter.propose([5, 6, 7], room=10, paused=False)
    assert none.tree.size == 1 and none.branch == []


def test_context_branch_merges_into_the_stream_tree() -> None:
    """The branch follows the stream nodes that carry its tokens and hangs its rest below
    the last of them; during the pause it hangs from the root alone."""
    drafter = ContextDrafter(StreamDrafter(product_tree([2, 1])), max_len=3, max_ngram=2)
    context = [4, 7, 5, 9, 1, 2, 4, 7]  # 4 7 was followed by 5 9 1
    drafter.observe(logits_ranking([6, 5], [9, 8]), context)
    draft = drafter.propose(context, room=10, paused=False)
    # stream nodes: 1 (6), 2 (5), 3 (9 under 1), 4 (9 under 2); 5 9 is the path 0-2-4
    assert draft.streams == 5 and draft.tree.size == 6
    assert draft.tokens.tolist() == [7, 6, 5, 9, 9, 1]
    assert draft.branch == [0, 2, 4, 5] and draft.tree.parent[5] == 4
    assert draft.stream_nodes is None  # one new node: every node may end the path
    paused = drafter.propose(context, room=10, paused=True)
    assert paused.tokens.tolist() == [7, 5, 9, 1] and paused.streams == 1
    assert paused.stream_nodes == [0, 3]  # inside the new nodes, the branch's end only
    full = drafter.propose(context, room=5, paused=False)  # no room for a new node
    assert full.tree.size == 5 and full.branch == [0, 2, 4]


def test_a_long_context_branch_skips_the_streams_and_leaves_them_stale() -> None:
    """A chain of at least ``skip_at`` tokens marks the draft; after a pass without the
    streams the drafter has nothing to draft from (the root and the branch alone) until
    it observes streams again."""
    context = [4, 7, 5, 9, 1, 2, 4, 7]  # 4 7 was followed by 5 9 1 2 ...
    for skip_at, marked in ((0, False), (3, True), (4, True), (5, False)):
        drafter = ContextDrafter(StreamDrafter(product_tree([2, 1])), max_len=4,
                                 max_ngram=2, skip_at=skip_at)
        drafter.observe(logits_ranking([6, 5], [9, 8]), context)
        assert drafter.propose(context, room=10, paused=False).skip_streams is marked
    assert not drafter.stale
    drafter.skip()
    assert drafter.stale
    stale = drafter.propose(context, room=10, paused=False)
    assert stale.streams == 1 and stale.tokens.tolist() == [7, 5, 9, 1, 2]
    drafter.observe(logits_ranking([6, 5], [9, 8]), context)
    assert not drafter.stale and drafter.propose(context, room=10, paused=False).streams == 5


def test_greedy_acceptor_on_a_hand_made_tree() -> None:
    tree = product_tree([2, 1])
    tokens = np.array([7, 5, 6, 9, 3])  # node i's token
    pred = np.array([6, 0, 3, 0, 8])  # the main stream's argmax after node i
    acceptor = GreedyAcceptor()
    assert acceptor.accept_now(tree, mx.array(tokens), mx.array(pred), None) == ([0, 2, 4], 8)
    assert acceptor.accept_now(tree, mx.array(tokens), mx.array([1, 0, 0, 0, 0]),
                               None) == ([0], 1)
    assert acceptor.first(logits_ranking([11])[0], [4, 2]) == 11
    main = mx.array(np.eye(V, dtype=np.float32)[pred])
    assert np.array(acceptor.targets(main, mx.array(tokens), tree, [1])).tolist() == pred.tolist()


def test_sampled_acceptor_with_exact_streams_takes_the_whole_chain() -> None:
    """Proposals equal to the targets are always accepted; the penalised greedy acceptor
    sees each node's own history."""
    params = SamplingParams(temp=1.0, seed=0)
    rng = params.make_rng()
    acceptor = SampledAcceptor(params, rng)
    drafter = StreamDrafter(product_tree([1, 1]), sampled_proposals(params, rng))
    stream = logits_ranking([3], [4])  # sharp: the proposals are nearly one-hot
    drafter.observe(stream * 5, [1, 2])
    draft = drafter.propose([1, 2], room=10, paused=False)
    mx.eval(draft.tokens, draft.q, draft.cands)
    assert draft.tokens.tolist() == [2, 3, 4]
    p = np.array(draft.q)
    p = np.concatenate([p, p[:1]])  # node i's target: the proposal of depth i + 1
    path, nxt = acceptor.accept_now(draft.tree, draft.tokens, mx.array(p), draft)
    assert path == [0, 1, 2] and 0 <= nxt < V
    penal = SampledAcceptor(SamplingParams(repetition_penalty=5.0, repetition_context_size=4),
                            rng)
    main = mx.array(np.tile(np.linspace(1.0, 2.0, V, dtype=np.float32), (3, 1)))
    pred = penal.targets(main, mx.array([15, 14, 13]), product_tree([1, 1]), [0, 15])
    assert np.array(pred).tolist() == [14, 13, 12]  # each node's path is penalised


def test_verify_prunes_and_commit_keeps_the_accepted_rows() -> None:
    """Perfect streams, peaked early exit: pruning keeps the rank-0 chain only; the
    lower layer commits the kept draft nodes, the upper layer the verified rows."""
    model = FakeModel(3, [3, 2, 1], streams_right=True, exit_probs="peaked")
    cache = model.make_cache()
    logits = prefill(model, PROMPT, cache, with_streams=True)
    context = PROMPT.tolist() + [GreedyAcceptor().first(logits[0], PROMPT.tolist())]
    assert context[-1] == succ(3)
    drafter = StreamDrafter(product_tree([3, 2, 1]))
    drafter.observe(logits[1 : 1 + drafter.rows], context)
    draft = drafter.propose(context, room=100, paused=False)
    x, tree, tokens, kept, _ = verify(model, cache, draft, True, prune_threshold=0.5)
    assert kept.tolist() == [0, 1, 4, 10] and tree.size == 4
    truth = [context[-1]]
    for _ in range(4):
        truth.append(succ(truth[-1]))
    assert tokens.tolist() == truth[:4]
    acceptor = GreedyAcceptor()
    targets = acceptor.targets(model.head(x[:4]), tokens, tree, context)
    path, nxt = acceptor.accept_now(tree, tokens, targets, draft)
    assert (path, nxt) == ([0, 1, 2, 3], truth[4])
    before = cache.offset
    commit(model, cache, path, kept)
    assert cache.offset == before + 4
    for layer in range(2):
        keys = np.array(cache.keys[layer][0, 0, before : before + 4, 0]).astype(int)
        assert keys.tolist() == truth[:4]


def test_commit_without_pruning_takes_the_path_in_every_layer() -> None:
    cache = TreeKVCache(2)
    for layer in range(2):
        k = mx.arange(5, dtype=mx.float32).reshape(1, 1, 5, 1)
        cache.write(layer, k, k)
    commit(SimpleNamespace(split=1, num_layers=2), cache, [0, 2, 4], None)
    assert cache.offset == 3
    assert np.array(cache.keys[1][0, 0, :3, 0]).tolist() == [0, 2, 4]
