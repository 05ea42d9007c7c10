"""The decode loop: lossless against mlx-lm, and tree / pruning / commit logic with a
fake model whose streams are perfect or always wrong."""

from __future__ import annotations

from types import SimpleNamespace

from mlx_specstream.cache import TreeKVCache
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.decode import DecodeStats, autoregressive_steps, speculative_steps
from mlx_specstream.tree import product_tree
from tinymodels import tiny_model

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

PROMPT = mx.array([1, 5, 7, 9, 11, 2, 3])


def mlx_lm_greedy(base, prompt: mx.array, n: int) -> list[int]:
    out = []
    for tok, _ in generate_step(prompt, base, max_tokens=n):
        out.append(int(tok))
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("topk", [[3, 2, 1], [1, 1, 1], [4], [2, 2]])
@pytest.mark.parametrize("threshold", [0.0, 0.02])
def test_speculative_equals_mlx_lm_greedy(model_type, topk, threshold) -> None:
    model = tiny_model(model_type, lora_rank=4, random_lora=True)
    ref = mlx_lm_greedy(model.base, PROMPT, 40)
    stats = DecodeStats()
    out = list(speculative_steps(model, PROMPT, 40, stats, product_tree(topk), threshold))
    assert out == ref
    assert stats.forward_passes >= 1


def test_autoregressive_mode_equals_mlx_lm() -> None:
    model = tiny_model("llama")
    ref = mlx_lm_greedy(model.base, PROMPT, 30)
    stats = DecodeStats()
    assert list(autoregressive_steps(model, PROMPT, 30, stats)) == ref
    assert stats.tokens_per_pass == 1.0


def test_deep_acceptance_on_a_real_model_stays_lossless() -> None:
    """A model with weak weights repeats itself, so untrained streams (~ main) get
    accepted at every depth: exercises multi-token commits on the real cache."""
    from mlx_specstream.model import SpecStreamModel
    from tinymodels import tiny_base

    base = tiny_base("llama", seed=3, spread=0.02)
    model = SpecStreamModel(base, SpecStreamConfig(num_streams=3, stream_layers=2))
    ref = mlx_lm_greedy(base, PROMPT, 41)
    stats = DecodeStats()
    out = list(speculative_steps(model, PROMPT, 41, stats))
    assert out == ref
    assert stats.tokens_per_pass > 1.5


def test_long_prompt_prefill_in_chunks() -> None:
    model = tiny_model("llama")
    prompt = mx.array(np.random.default_rng(0).integers(0, 64, 700).astype(np.int32))
    ref = mlx_lm_greedy(model.base, prompt, 10)
    assert list(speculative_steps(model, prompt, 10, DecodeStats())) == ref


def test_prompt_longer_than_context_is_a_clear_error() -> None:
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="context"):
        list(speculative_steps(model, mx.zeros((1100,), mx.int32), 5, DecodeStats()))
    with pytest.raises(ValueError, match="empty"):
        list(speculative_steps(model, mx.zeros((0,), mx.int32), 5, DecodeStats()))


# --- a fake model: token t is always followed by succ(t) -----------------------------

V = 50


def succ(t: int) -> int:
    return (7 * t + 3) % V


class FakeModel:
    """Speaks SpecStreamModel's interface.  Hidden states carry token ids; keys carry
    token ids too, so the cache content can be checked against the output."""

    def __init__(self, gamma: int, topk: list[int], streams_right: bool, exit_probs: str):
        self.cfg = SpecStreamConfig(num_streams=gamma, stream_layers=1, tree_topk=topk)
        self.args = SimpleNamespace(max_position_embeddings=4096)
        self.num_layers, self.split = 2, 1
        self.streams_right = streams_right
        self.exit_probs = exit_probs  # "uniform" or "peaked"

    def make_cache(self, max_size=None) -> TreeKVCache:
        self.cache = TreeKVCache(self.num_layers, max_size)
        return self.cache

    @staticmethod
    def _onehot(ids: mx.array) -> mx.array:
        return (mx.arange(V) == ids[..., None]).astype(mx.float32) * 10.0

    def _write(self, layer, h, cache) -> None:
        if cache is not None:
            k = h[0].reshape(1, 1, -1, 1)
            cache.write(layer, k, k)

    def lower(self, tokens, positions, mask=None, cache=None):
        h = tokens.reshape(1, -1, 1).astype(mx.float32)
        self._write(0, h, cache)
        return h

    def exit_logits(self, h):
        ids = h[..., 0]
        if self.exit_probs == "uniform":
            return mx.zeros(ids.shape + (V,))
        nxt = (7 * ids.astype(mx.int32) + 3) % V
        return self._onehot(nxt)

    def upper_hidden(self, h, positions, mask=None, cache=None, stream_rows=None,
                     with_streams=True):
        """Rows of (token the head predicts, token the head ranks last or -1)."""
        self._write(1, h, cache)
        ids = h[0, :, 0].astype(mx.int32)
        none = mx.full(ids.shape, -1, mx.int32)
        rows = [mx.stack([(7 * ids + 3) % V, none], axis=-1)]
        if with_streams:
            host = ids if stream_rows is None else ids[stream_rows]
            cur = (7 * host + 3) % V  # the root
            per_stream = []
            for _ in range(self.cfg.num_streams):
                cur = (7 * cur + 3) % V  # stream j predicts the token j+1 after the root
                if self.streams_right:
                    per_stream.append(mx.stack([cur, mx.full(cur.shape, -1, mx.int32)], -1))
                else:  # a wrong guess, and the true token ranked last
                    per_stream.append(mx.stack([(cur + 1) % V, cur], -1))
            rows.append(mx.stack(per_stream, axis=1).reshape(-1, 2))
        return mx.concatenate(rows, axis=0)[None].astype(mx.float32)

    def head(self, x):
        ids = x[..., 0].astype(mx.int32)
        low = x[..., 1].astype(mx.int32)
        return self._onehot(ids) - 2.0 * self._onehot(low)

    def draft_logits(self, x):
        return self.head(x)


def truth(prompt_last: int, n: int) -> list[int]:
    out, t = [], prompt_last
    for _ in range(n):
        t = succ(t)
        out.append(t)
    return out


@pytest.mark.parametrize("gamma,topk", [(3, [3, 2, 1]), (4, [2, 2, 1, 1]), (2, [1, 1])])
def test_perfect_streams_give_one_plus_gamma_tokens_per_pass(gamma, topk) -> None:
    model = FakeModel(gamma, topk, streams_right=True, exit_probs="uniform")
    steps = 7
    n = 1 + steps * (1 + gamma)
    stats = DecodeStats()
    out = list(speculative_steps(model, PROMPT, n, stats))
    assert out == truth(3, n)
    assert stats.forward_passes == steps
    assert stats.tokens_per_pass == 1 + gamma
    assert stats.accepted_per_depth == [steps] * gamma
    # the cache holds exactly prompt + accepted tokens (the last step's are committed too)
    committed = model.cache.offset
    assert committed == PROMPT.shape[0] + n - 1
    for layer in range(2):
        keys = np.array(model.cache.keys[layer][0, 0, :committed, 0]).astype(int).tolist()
        assert keys == PROMPT.tolist() + out[:-1]


def test_wrong_streams_give_one_token_per_pass() -> None:
    model = FakeModel(3, [3, 2, 1], streams_right=False, exit_probs="uniform")
    stats = DecodeStats()
    out = list(speculative_steps(model, PROMPT, 20, stats))
    assert out == truth(3, 20)
    assert stats.tokens_per_pass == 1.0
    assert stats.accepted_per_depth == [0, 0, 0]


def test_pruning_above_every_probability_collapses_to_the_root() -> None:
    model = FakeModel(3, [3, 2, 1], streams_right=True, exit_probs="uniform")
    stats = DecodeStats()
    out = list(speculative_steps(model, PROMPT, 20, stats, prune_threshold=0.5))
    assert out == truth(3, 20)
    assert stats.tokens_per_pass == 1.0
    assert stats.tree_nodes == stats.forward_passes  # root only


def test_pruning_keeps_confident_paths() -> None:
    model = FakeModel(3, [3, 2, 1], streams_right=True, exit_probs="peaked")
    stats = DecodeStats()
    out = list(speculative_steps(model, PROMPT, 1 + 5 * 4, stats, prune_threshold=0.5))
    assert out == truth(3, 21)
    assert stats.tokens_per_pass == 4.0
    assert stats.tree_nodes == 4 * stats.forward_passes  # one chain survives


def test_prompt_lookup_is_lossless_and_accepts_copies() -> None:
    from mlx_specstream.decode import lookup_steps
    from mlx_specstream.drafting import find_draft

    assert find_draft([1, 2, 3, 9, 1, 2], max_ngram=2, num_draft=3) == [3, 9, 1]
    assert find_draft([5, 6, 7], max_ngram=2) == []
    model = tiny_model("llama")
    ref = mlx_lm_greedy(model.base, PROMPT, 40)
    stats = DecodeStats()
    assert list(lookup_steps(model, PROMPT, 40, stats)) == ref
    # a weak model that repeats itself: lookup drafts get accepted
    from mlx_specstream.model import SpecStreamModel
    from tinymodels import tiny_base

    base = tiny_base("llama", seed=3, spread=0.02)
    weak = SpecStreamModel(base, SpecStreamConfig())
    ref = mlx_lm_greedy(base, PROMPT, 41)
    stats = DecodeStats()
    assert list(lookup_steps(weak, PROMPT, 41, stats)) == ref
    assert stats.tokens_per_pass > 2.0


def test_adaptive_pause_when_drafts_do_not_pay() -> None:
    """Wrong streams and a tree pass costing 1.5 plain passes: drafting pauses, the output
    is unchanged, and most passes are plain ones."""
    model = FakeModel(3, [3, 2, 1], streams_right=False, exit_probs="uniform")
    model.cfg.draft_cost_ratio = 1.5
    stats = DecodeStats()
    out = list(speculative_steps(model, PROMPT, 60, stats))
    assert out == truth(3, 60)
    tree_passes = stats.tree_nodes // 16
    assert tree_passes < stats.forward_passes / 3


def test_no_pause_when_drafts_pay() -> None:
    model = FakeModel(3, [3, 2, 1], streams_right=True, exit_probs="uniform")
    model.cfg.draft_cost_ratio = 1.5
    stats = DecodeStats()
    out = list(speculative_steps(model, PROMPT, 1 + 7 * 4, stats))
    assert out == truth(3, 29)
    assert stats.tokens_per_pass == 4.0


def test_pause_policy() -> None:
    """The pause on its own: it starts optimistic, pauses once the running tokens per tree
    pass falls below the cost ratio, runs its plain passes (streams on the last), then
    lets one probe decide from a neutral mean: a failed probe pauses again for twice as
    long (capped), a paying probe resets the span; ratio 0 never pauses."""
    from mlx_specstream.decode import Pause

    p = Pause(1.5, tokens=3, max_tokens=8)
    p.observe(2)  # 0.7 * 2.5 + 0.3 * 2 = 2.35
    assert not p.active
    p.observe(1)  # 1.945
    p.observe(1)  # 1.66
    assert not p.active
    p.observe(1)  # 1.46 < 1.5
    assert p.active and p.left == 3
    assert [p.take(), p.take(), p.take()] == [False, False, True]
    assert not p.active and p.ema == 1.5

    def run_out() -> None:
        while p.active:
            p.take()

    spans = []
    for _ in range(4):  # failing probes back off: 6, 8 (the cap), 8, 8
        p.observe(1)
        spans.append(p.left)
        run_out()
    assert spans == [6, 8, 8, 8]
    p.observe(2)  # 0.7 * 1.5 + 0.3 * 2 = 1.65: the probe pays, drafting goes on
    assert not p.active and p.span == 3
    p.observe(1)  # 1.455: an ordinary pause, of the base span
    assert p.left == 3
    never = Pause(0.0)
    for _ in range(20):
        never.observe(1)
    assert not never.active


@pytest.mark.parametrize("ratio", [0.0, 1.3, 50.0])
def test_adaptive_pause_is_lossless_on_a_real_model(ratio: float) -> None:
    model = tiny_model("llama", lora_rank=4, random_lora=True, draft_cost_ratio=ratio)
    ref = mlx_lm_greedy(model.base, PROMPT, 60)
    assert list(speculative_steps(model, PROMPT, 60, DecodeStats())) == ref


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_dynamic_chains_equal_mlx_lm_greedy(model_type) -> None:
    model = tiny_model(model_type, lora_rank=4, random_lora=True)
    ref = mlx_lm_greedy(model.base, PROMPT, 40)
    stats = DecodeStats()
    assert list(speculative_steps(model, PROMPT, 40, stats, dynamic=True)) == ref


def test_dynamic_chains_follow_confidence() -> None:
    """When extra nodes cost nothing, every step drafts the longest chain (the same
    steps as the static chain); when they cost a lot, the chain shrinks to the root.
    Output is the same either way."""
    from mlx_specstream.model import SpecStreamModel
    from mlx_specstream.tree import tree_from_paths
    from tinymodels import tiny_base

    base = tiny_base("llama", seed=3, spread=0.02)
    model = SpecStreamModel(base, SpecStreamConfig(num_streams=3, stream_layers=2,
                                                   tree_costs=[1.0, 1.0, 1.0, 1.0]))
    ref = mlx_lm_greedy(base, PROMPT, 41)
    stats = DecodeStats()
    assert list(speculative_steps(model, PROMPT, 41, stats, dynamic=True)) == ref
    chain = DecodeStats()
    list(speculative_steps(model, PROMPT, 41, chain, tree_from_paths([[0], [0, 0], [0, 0, 0]])))
    assert stats.tree_nodes == 4 * stats.forward_passes
    assert (stats.forward_passes, stats.step_tokens) == (chain.forward_passes, chain.step_tokens)
    assert stats.tokens_per_pass > 1.0
    model.cfg.tree_costs = [1.0, 50.0, 100.0, 150.0]
    stats = DecodeStats()
    assert list(speculative_steps(model, PROMPT, 41, stats, dynamic=True)) == ref
    assert stats.tokens_per_pass == 1.0


# --- context (prompt-lookup) branch in the stream tree ---------------------------------


def test_context_branch_tree_shape() -> None:
    """A chain hung from a node of a product tree: new ids after the tree's, depths (so
    positions) continuing the attach node's past the streams' depth, masks = ancestors,
    and the stream nodes' candidate indices unchanged."""
    from mlx_specstream.tree import follow_chain, with_chain

    base = product_tree([3, 2, 1])  # 16 nodes, depths 0..3
    t = with_chain(base, 0, 5)
    assert t.size == 21 and t.kmax == base.kmax
    assert t.parent[16:].tolist() == [0, 16, 17, 18, 19]
    assert t.depth[16:].tolist() == [1, 2, 3, 4, 5]
    assert t.max_depth == 5
    assert np.array_equal(t.mask[:16, :16], base.mask)
    assert not t.mask[:16, 16:].any() and not t.mask[16:, 1:16].any()
    for i in range(16, 21):
        assert np.nonzero(t.mask[i])[0].tolist() == [0] + list(range(16, i + 1))
    assert np.array_equal(t.gather_index[:15], base.gather_index)
    assert t.children[0] == (1, 2, 3, 16)

    leaf = 10  # depth 3, under 4 (depth 2) under 1 (depth 1)
    assert base.depth[leaf] == 3
    deep = with_chain(base, leaf, 2)
    assert deep.parent[16:].tolist() == [leaf, 16]
    assert deep.depth[16:].tolist() == [4, 5]
    anc = [0, int(base.parent[base.parent[leaf]]), int(base.parent[leaf]), leaf]
    assert np.nonzero(deep.mask[17])[0].tolist() == anc + [16, 17]
    assert with_chain(base, 3, 0) is base
    with pytest.raises(ValueError):
        with_chain(base, 16, 1)

    tokens = np.arange(100, 116)  # node i carries token 100 + i
    assert follow_chain(base, tokens, [101, 104, 110, 7]) == [0, 1, 4, 10]
    assert follow_chain(base, tokens, [101, 106, 7]) == [0, 1]  # node 6 hangs from 2
    assert follow_chain(base, tokens, [7, 101]) == [0]


def test_find_draft_minimum_ngram() -> None:
    from mlx_specstream.drafting import find_draft

    assert find_draft([4, 1, 9, 8, 1], max_ngram=3, num_draft=2) == [9, 8]
    assert find_draft([4, 1, 9, 8, 1], max_ngram=3, num_draft=2, min_ngram=2) == []
    assert find_draft([4, 1, 9, 8, 4, 1], max_ngram=3, num_draft=2, min_ngram=2) == [9, 8]


# The fake's sequence 3 -> 24 -> 21 -> 0 -> 3 has period 4: after a few tokens the context
# repeats, so the context branch drafts the true continuation.


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_context_branch_carries_wrong_streams(threshold) -> None:
    """Streams always wrong: every drafted token that is accepted comes from the context
    branch (kept by pruning even when the early exit drops every stream node), and the
    cache holds exactly the prompt and the output."""
    model = FakeModel(3, [3, 2, 1], streams_right=False, exit_probs="uniform")
    stats = DecodeStats()
    out = list(speculative_steps(model, PROMPT, 60, stats, prune_threshold=threshold,
                                 lookup_branches=4))
    assert out == truth(3, 60)
    assert stats.lookup_passes > 0
    assert stats.lookup_accepted == stats.step_tokens - stats.forward_passes
    assert stats.tokens_per_pass > 3.0
    assert len(stats.accepted_per_depth) == 4  # the branch reaches below the streams
    committed = model.cache.offset
    for layer in range(2):
        keys = np.array(model.cache.keys[layer][0, 0, :committed, 0]).astype(int).tolist()
        assert keys == PROMPT.tolist() + out[: committed - PROMPT.shape[0]]


def test_context_branch_merges_into_stream_paths() -> None:
    """Perfect streams: the branch follows the stream path that holds its tokens and adds
    only the node below it (depth 4, past the 3 streams); no sibling repeats a token."""
    model = FakeModel(3, [3, 2, 1], streams_right=True, exit_probs="uniform")
    stats = DecodeStats()
    out = list(speculative_steps(model, PROMPT, 1 + 12 * 5, stats, lookup_branches=4))
    assert out == truth(3, 61)
    assert stats.tree_nodes <= 17 * stats.forward_passes
    assert stats.lookup_accepted == stats.lookup_passes > 0  # one node below the streams
    assert stats.tokens_per_pass > 4.0
    plain = DecodeStats()
    assert list(speculative_steps(model, PROMPT, 61, plain)) == out
    assert plain.tokens_per_pass == 4.0 and plain.lookup_passes == 0


def test_context_branch_during_the_pause() -> None:
    """A tree pass never pays (cost ratio 50): drafting pauses, and the paused passes
    verify the context branch alone, several tokens a pass, losslessly."""
    model = FakeModel(3, [3, 2, 1], streams_right=False, exit_probs="uniform")
    model.cfg.draft_cost_ratio = 50.0
    stats = DecodeStats()
    out = list(speculative_steps(model, PROMPT, 80, stats, lookup_branches=4))
    assert out == truth(3, 80)
    assert stats.lookup_accepted > 40
    committed = model.cache.offset
    keys = np.array(model.cache.keys[1][0, 0, :committed, 0]).astype(int).tolist()
    assert keys == PROMPT.tolist() + out[: committed - PROMPT.shape[0]]


def test_streams_run_on_the_stream_nodes_and_the_branch_end_only() -> None:
    """Branches that go past the stream tree: those passes run the streams of the tree's
    nodes and of the branch's end only; the output is the truth, and a branch taken
    whole drafts the next pass from the streams of its end."""
    model = FakeModel(3, [2, 1], streams_right=True, exit_probs="uniform")
    seen: list = []
    upper = model.upper_hidden

    def spy(h, positions, mask=None, cache=None, stream_rows=None, with_streams=True):
        if with_streams:
            seen.append(None if stream_rows is None else stream_rows.tolist())
        return upper(h, positions, mask, cache, stream_rows, with_streams)

    model.upper_hidden = spy
    stats = DecodeStats()
    out = list(speculative_steps(model, PROMPT, 60, stats, lookup_branches=4,
                                 lookup_skip_streams=0))
    assert out == truth(3, 60)
    partial = [r for r in seen[1:] if r is not None]  # seen[0]: the prefill's last row
    assert seen[0] == [PROMPT.shape[0] - 1] and len(partial) > len(seen) // 2
    assert all(r == [0, 1, 2, 3, 4, 6] for r in partial)  # 5 nodes of [2, 1], the end
    model.upper_hidden = upper
    streams_only = DecodeStats()
    assert list(speculative_steps(model, PROMPT, 60, streams_only, lookup_branches=0)) == out
    assert stats.tokens_per_pass > streams_only.tokens_per_pass


@pytest.mark.parametrize("skip_at", [1, 4])
def test_passes_with_a_long_context_branch_run_without_the_streams(skip_at) -> None:
    """Streams always wrong, the context right: passes whose branch is long run without
    the stream rows, the next pass drafts from the context alone, the output is the
    truth, and as many tokens come per pass as with the streams always on."""
    model = FakeModel(3, [3, 2, 1], streams_right=False, exit_probs="uniform")
    calls: list[bool] = []
    upper = model.upper_hidden

    def spy(*args, with_streams=True, **kw):
        calls.append(with_streams)
        return upper(*args, with_streams=with_streams, **kw)

    model.upper_hidden = spy
    stats = DecodeStats()
    out = list(speculative_steps(model, PROMPT, 60, stats, lookup_branches=4,
                                 lookup_skip_streams=skip_at))
    assert out == truth(3, 60)
    assert calls.count(False) > len(calls) // 2  # the copying passes saved the streams
    always = DecodeStats()
    model.upper_hidden = upper
    assert list(speculative_steps(model, PROMPT, 60, always, lookup_branches=4)) == out
    assert stats.tokens_per_pass >= always.tokens_per_pass - 0.5
    with pytest.raises(ValueError, match="lookup_skip_streams"):
        SpecStreamConfig(lookup_skip_streams=-1)


REPEATS = mx.array([1, 5, 7, 9, 11, 2, 3, 8, 1, 5, 7, 9, 11, 2, 3, 8, 1, 5, 7])


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("topk,threshold", [([3, 2, 1], 0.0), ([1, 1, 1], 0.02), ([2], 0.0)])
def test_context_branch_equals_mlx_lm_greedy(model_type, topk, threshold) -> None:
    model = tiny_model(model_type, lora_rank=4, random_lora=True)
    for prompt in (PROMPT, REPEATS):
        ref = mlx_lm_greedy(model.base, prompt, 40)
        stats = DecodeStats()
        out = list(speculative_steps(model, prompt, 40, stats, product_tree(topk), threshold,
                                     lookup_branches=5))
        assert out == ref


@pytest.mark.parametrize("mode", ["tree", "pruned", "dynamic", "paused", "root-only", "skip"])
def test_context_branch_is_used_and_lossless_on_a_repeating_model(mode) -> None:
    """A weak model repeats itself, so the context branch is proposed and accepted; the
    output stays the base model's greedy output in every mode."""
    from mlx_specstream.model import SpecStreamModel
    from tinymodels import tiny_base

    base = tiny_base("llama", seed=3, spread=0.02)
    cfg = SpecStreamConfig(num_streams=3, stream_layers=2, draft_cost_ratio=50.0 * (
        mode == "paused"), prune_threshold=0.02 * (mode == "pruned"))
    model = SpecStreamModel(base, cfg)
    ref = mlx_lm_greedy(base, REPEATS, 41)
    stats = DecodeStats()
    tree = product_tree([]) if mode == "root-only" else None
    out = list(speculative_steps(model, REPEATS, 41, stats, tree, dynamic=mode == "dynamic",
                                 lookup_branches=4, lookup_skip_streams=2 * (mode == "skip")))
    assert out == ref
    assert stats.lookup_accepted > 0


def test_lookup_branches_option_and_config() -> None:
    from mlx_specstream.generate_cli import add_decoding_arguments, decoding_kwargs

    assert SpecStreamConfig().lookup_branches == 0
    assert SpecStreamConfig.from_dict({"lookup_branches": 3}).lookup_branches == 3
    with pytest.raises(ValueError, match="lookup_branches"):
        SpecStreamConfig(lookup_branches=-1)
    import argparse

    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser)
    assert decoding_kwargs(parser.parse_args(["--lookup-branches", "4"]))["lookup_branches"] == 4
    assert "lookup_branches" not in decoding_kwargs(parser.parse_args([]))
    assert decoding_kwargs(parser.parse_args(["--no-lookup-corpus"]))["lookup_corpus"] is False
    assert "lookup_corpus" not in decoding_kwargs(parser.parse_args([]))
    model = tiny_model("llama", lookup_branches=4)  # the config's default applies
    stats = DecodeStats()
    list(speculative_steps(model, REPEATS, 20, stats))
    off = DecodeStats()
    list(speculative_steps(model, REPEATS, 20, off, lookup_branches=0))
    assert off.lookup_passes == 0


def test_stream_generate_lookup_branches(api_model) -> None:
    from mlx_specstream import stream_generate

    model, tok = api_model
    prompt = "the theory of the thing is that the theory of the thing is that the"
    plain = list(stream_generate(model, tok, prompt, 24, speculative=False))
    spec = list(stream_generate(model, tok, prompt, 24, lookup_branches=4))
    assert [r.token for r in spec] == [r.token for r in plain]
    assert spec[-1].lookup_accepted >= 0
    def sampled() -> list[int]:  # the law: test_sampling; here the seed fixes the tokens
        return [r.token for r in stream_generate(model, tok, prompt, 8, temp=0.7, seed=1,
                                                 lookup_branches=4)]

    assert sampled() == sampled()
    with pytest.raises(ValueError, match="lookup_branches"):
        list(stream_generate(model, tok, prompt, 4, lookup_branches=-1))
