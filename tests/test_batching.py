"""Continuous batching: every batched sequence is the same sequence decoded alone
(greedy: token for token; seeded sampling: the same draws; the sampled law unchanged),
whatever joins or leaves the batch; the batched cache and the batch tree size alone."""

from __future__ import annotations

from collections import Counter

from mlx_specstream import batch_generate, generate
from mlx_specstream.batching import (
    BatchDecoder,
    BatchKVCache,
    batch_tree_size,
    kept_nodes,
    node_probabilities,
)
from mlx_specstream.cache import TreeKVCache
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.decode import DecodeStats, speculative_steps
from mlx_specstream.drafting import monotone_costs
from mlx_specstream.model import SpecStreamModel
from mlx_specstream.sampled import sampled_speculative_steps
from mlx_specstream.sampling import SamplingParams
from mlx_specstream.tree import product_tree
from tinymodels import tiny_base, tiny_model

import mlx.core as mx
import numpy as np
import pytest
from test_sampling import ALPHA, MODEL_PARAMS, PROMPT, goodness_of_fit, model_law, small_model

__all__ = ["model_law", "small_model"]  # fixtures shared with test_sampling

RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(0, 64, n).tolist() for n in (7, 30, 3, 61)]
MAXES = [40, 25, 33, 12]


def repeating_model() -> SpecStreamModel:
    """Weak weights repeat themselves: untrained streams are accepted at every depth."""
    base = tiny_base("llama", seed=3, spread=0.02)
    return SpecStreamModel(base, SpecStreamConfig(num_streams=3, stream_layers=2))


def alone(model, prompt, n, tree=None, **kw) -> list[int]:
    return list(speculative_steps(model, mx.array(prompt), n, DecodeStats(), tree, **kw))


def run(decoder: BatchDecoder, joins: dict[int, tuple] | None = None) -> dict[int, list[int]]:
    """Step ``decoder`` until it is empty; ``joins``: step -> (prompt, max_tokens, kw)
    added before that step.  Returns each sequence's tokens by id."""
    out: dict[int, list[int]] = {}
    step = 0
    joins = dict(joins or {})
    while decoder.active or joins:
        if step in joins:
            prompt, n, kw = joins.pop(step)
            out[decoder.add(prompt, n, **kw)] = []
        for ev in decoder.step():
            out.setdefault(ev.uid, []).extend(ev.tokens)
        step += 1
    return out


@pytest.mark.parametrize("which", ["repeating", "lora"])
@pytest.mark.parametrize("topk", [[3, 2, 1], [1, 1, 1], [2]])
@pytest.mark.parametrize("size_trees", [True, False])
def test_batched_greedy_equals_each_prompt_alone(which, topk, size_trees) -> None:
    model = repeating_model() if which == "repeating" else tiny_model(lora_rank=4,
                                                                      random_lora=True)
    tree = product_tree(topk)
    decoder = BatchDecoder(model, size_trees=size_trees)
    ids = [decoder.add(p, n, tree=tree, lookup_branches=0)
           for p, n in zip(PROMPTS, MAXES, strict=True)]
    out = run(decoder)
    for uid, p, n in zip(ids, PROMPTS, MAXES, strict=True):
        assert out[uid] == alone(model, p, n, tree, lookup_branches=0), uid
    assert decoder.passes < sum(MAXES)  # sequences shared passes
    if which == "repeating":
        assert decoder.cache.size == 0  # everyone left


@pytest.mark.parametrize("mode", ["dynamic", "lookup", "lookup-skip", "plain"])
def test_batched_drafters_equal_alone(mode) -> None:
    """Dynamic chains, context branches (passes with a long one without the streams, too)
    and plain decoding (speculative off)."""
    model = repeating_model()
    kw = {"dynamic": {"dynamic_tree": True, "lookup_branches": 0},
          "lookup": {"lookup_branches": 4},
          "lookup-skip": {"lookup_branches": 4, "lookup_skip_streams": 2},
          "plain": {"speculative": False}}[mode]
    decoder = BatchDecoder(model)
    ids = [decoder.add(p, n, **kw) for p, n in zip(PROMPTS, MAXES, strict=True)]
    out = run(decoder)
    for uid, p, n in zip(ids, PROMPTS, MAXES, strict=True):
        if mode == "plain":
            ref = alone(model, p, n, product_tree([]), lookup_branches=0)
        else:
            ref = alone(model, p, n, dynamic=kw.get("dynamic_tree"),
                        lookup_branches=kw["lookup_branches"],
                        lookup_skip_streams=kw.get("lookup_skip_streams"))
        assert out[uid] == ref


@pytest.mark.parametrize("kw", [{}, {"speculative": False}, {"lookup_branches": 4}])
def test_prompts_that_arrive_together_are_prefilled_in_one_pass(kw) -> None:
    """Whole prompts of similar lengths share one left-padded prefill pass (their first
    tokens come out of the same step) and decode as each alone; a first token that ends
    its sequence, and prompts too different in length, are handled on the way."""
    model = tiny_model(lora_rank=4, random_lora=True)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 64, n).tolist() for n in (20, 23, 18, 25, 4)]
    ref_kw = {"tree": product_tree([]), "lookup_branches": 0} if kw else {}
    refs = [alone(model, p, 15, **(ref_kw if "speculative" in kw else kw)) for p in prompts]
    firsts = [r[0] for r in refs[:4]]
    eos = next(t for t in firsts if firsts.count(t) == 1)  # one prompt ends at once
    decoder = BatchDecoder(model, eos_token_ids=[eos])
    ids = [decoder.add(p, 15, **kw) for p in prompts]
    first = decoder.step()
    assert sorted(ev.uid for ev in first) == ids[:4]  # the short one waits
    assert decoder.passes == 0 and len(decoder.running) == 3
    out: dict[int, list[int]] = {}
    for ev in first + decoder.step() + decoder.step():  # the short one joins; they decode
        out.setdefault(ev.uid, []).extend(ev.tokens)
    later = [rng.integers(0, 64, n).tolist() for n in (21, 19)]  # a group joins them
    ids += [decoder.add(p, 12, **kw) for p in later]
    refs += [alone(model, p, 12, **(ref_kw if "speculative" in kw else kw)) for p in later]
    for uid, toks in run(decoder).items():
        out.setdefault(uid, []).extend(toks)
    for uid, ref in zip(ids, refs, strict=True):
        assert out[uid] == (ref[: ref.index(eos)] if eos in ref else ref), uid


def test_sequences_join_mid_way_with_chunked_prefill() -> None:
    """Joins while others decode (one prefill chunk per step, prompts longer than a
    chunk), sequences ending at different steps, an end-of-sequence token."""
    model = tiny_model(lora_rank=4, random_lora=True)
    long_prompt = RNG.integers(0, 64, 50).tolist()
    decoder = BatchDecoder(model, prefill_chunk=16)
    first = decoder.add(PROMPTS[0], 30)
    out = run(decoder, {3: (long_prompt, 20, {}), 5: (PROMPTS[2], 1, {}),
                        9: (PROMPTS[1], 25, {})})
    ids = sorted(out)
    assert ids[0] == first and len(ids) == 4
    refs = [alone(model, PROMPTS[0], 30), alone(model, long_prompt, 20),
            alone(model, PROMPTS[2], 1), alone(model, PROMPTS[1], 25)]
    for uid, ref in zip(ids, refs, strict=True):
        assert out[uid] == ref
    # An end-of-sequence token ends its sequence alone (and is not emitted).
    eos = refs[3][10]
    decoder = BatchDecoder(model, eos_token_ids=[eos])
    a, b = decoder.add(PROMPTS[1], 25), decoder.add(PROMPTS[0], 30)
    out = run(decoder)
    assert out[a] == refs[3][: refs[3].index(eos)]
    assert out[b] == (refs[0][: refs[0].index(eos)] if eos in refs[0] else refs[0])


def test_cancel_leaves_the_others_untouched() -> None:
    model = repeating_model()
    decoder = BatchDecoder(model)
    ids = [decoder.add(p, n) for p, n in zip(PROMPTS, MAXES, strict=True)]
    out: dict[int, list[int]] = {u: [] for u in ids}
    for step in range(40):
        if step == 6:
            assert decoder.cancel(ids[1])
        for ev in decoder.step():
            out[ev.uid].extend(ev.tokens)
    assert not decoder.active and not decoder.cancel(ids[1])
    for i in (0, 2, 3):
        assert out[ids[i]] == alone(model, PROMPTS[i], MAXES[i])


def test_context_limit_ends_a_sequence_with_length() -> None:
    model = tiny_model()
    decoder = BatchDecoder(model)
    long_prompt = RNG.integers(0, 64, 1015).tolist()
    uid = decoder.add(long_prompt, 50)
    other = decoder.add(PROMPTS[0], 12)
    out = run(decoder)
    assert out[uid] == alone(model, long_prompt, 50) and len(out[uid]) < 50
    assert out[other] == alone(model, PROMPTS[0], 12)
    with pytest.raises(ValueError, match="context"):
        decoder.add(list(range(5)) * 300, 5)


# ------------------------------------------------------------------ sampling


@pytest.fixture
def with_corpus(small_model):
    """The small model with a corpus of its own samples (context branches from it)."""
    from mlx_specstream.corpus import DraftCorpus
    from mlx_specstream.sampled import sampled_autoregressive_steps

    texts = [list(sampled_autoregressive_steps(
        small_model, PROMPT, 8, DecodeStats(),
        SamplingParams(**{**MODEL_PARAMS.__dict__, "seed": 9 * 10**6 + i}))) for i in range(60)]
    small_model.draft_corpus = DraftCorpus(np.array([t for x in texts for t in [*x, -1]]))
    yield small_model
    small_model.draft_corpus = None


@pytest.mark.parametrize("lookup", [0, 3])
def test_seeded_sampling_in_a_batch_is_reproducible_and_equals_alone(with_corpus,
                                                                     lookup) -> None:
    """With ``lookup`` > 0 the sequences also draft context branches (from the corpus)."""
    small_model = with_corpus
    params = [SamplingParams(**{**MODEL_PARAMS.__dict__, "seed": s}) for s in (1, 2, 3)]
    prompts = [[1, 5, 7], [2, 3], [9, 9, 9, 4]]

    def batch(size_trees: bool) -> list[list[int]]:
        decoder = BatchDecoder(small_model, size_trees=size_trees)
        ids = [decoder.add(p, 12, q, lookup_branches=lookup)
               for p, q in zip(prompts, params, strict=True)]
        out = run(decoder)
        return [out[u] for u in ids]

    assert batch(True) == batch(True)
    fixed = batch(False)
    assert fixed == batch(False)
    for p, q, got in zip(prompts, params, fixed, strict=True):
        stats = DecodeStats()
        assert got == list(sampled_speculative_steps(small_model, mx.array(p), 12, stats, q,
                                                     lookup_branches=lookup))
        assert (stats.lookup_passes > 0) == (lookup > 0)


@pytest.mark.parametrize("batch,sized,lookup", [(24, False, 0), (8, True, 0), (8, True, 3)])
def test_batched_sampling_keeps_the_model_law(with_corpus, model_law, batch, sized,
                                              lookup) -> None:
    """1200 seeded sequences in batches, goodness of fit of the first three tokens against
    the exact law.  Sized: rows priced so that each step verifies 5 or 6 of the 13 nodes
    of every tree (the sizes follow the streams' probabilities of each batch); lookup:
    with context branches from the corpus, cut with the trees."""
    small_model = with_corpus
    counts: Counter = Counter()
    for start in range(0, 1200, batch):
        decoder = BatchDecoder(small_model, size_trees=sized)
        decoder.pass_cost = monotone_costs([1.0 + 0.03 * n for n in range(128)])
        ids = [decoder.add(PROMPT, 3, SamplingParams(**{**MODEL_PARAMS.__dict__,
                                                        "seed": 7 * 10**6 + start + i}),
                           lookup_branches=lookup)
               for i in range(batch)]
        out = run(decoder)
        counts.update(tuple(out[u]) for u in ids)
        if sized:
            assert batch < decoder.rows / decoder.passes < 13 * batch  # trees were cut
    stat, df, pval = goodness_of_fit(counts, model_law)
    assert pval > ALPHA, (stat, df)


# ------------------------------------------------------------------ the parts


def test_batch_cache_commit_holes_compaction_join_and_removal() -> None:
    """Keys written as their own slot ids: what each sequence sees is checked exactly."""
    H, D = 1, 1
    cache = BatchKVCache(num_layers=1)

    def single(n: int, base: float) -> TreeKVCache:
        c = TreeKVCache(1)
        k = mx.arange(n, dtype=mx.float32).reshape(1, H, n, D) + base
        c.write(0, k, k)
        c.commit()
        return c

    def seen(b: int) -> list[float]:
        return np.array(cache.keys[0][b, 0, : cache.ptr, 0])[cache.valid[b, : cache.ptr]].tolist()

    cache.add(single(3, 100))
    cache.add(single(5, 200))  # longer: the first is shifted right
    assert cache.ptr == 5 and cache.lengths.tolist() == [3, 5]
    assert seen(0) == [100, 101, 102] and seen(1) == [200, 201, 202, 203, 204]
    rows = mx.array([[[[10.0], [11.0], [12.0]]], [[[20.0], [21.0], [22.0]]]])
    cache.write(0, rows, rows)
    m = cache.attention_mask(mx.ones((2, 3, 3), dtype=mx.bool_), None, 0)
    assert m.shape == (2, 1, 3, 8)
    assert np.array(m[0, 0, 0]).tolist() == [False, False] + [True] * 6
    cache.commit([[0, 2], []])
    assert seen(0) == [100, 101, 102, 10, 12] and seen(1) == [200, 201, 202, 203, 204]
    assert cache.lengths.tolist() == [5, 5] and cache.holes == 4
    cache.compact()
    assert cache.ptr == 5 and cache.holes == 0
    assert seen(0) == [100, 101, 102, 10, 12] and seen(1) == [200, 201, 202, 203, 204]
    cache.add(single(2, 300))
    cache.remove([0])
    assert seen(0) == [200, 201, 202, 203, 204] and seen(1) == [300, 301]
    with pytest.raises(IndexError):
        cache.commit([[0], [5]])


def test_batch_tree_size_follows_costs_and_confidence() -> None:
    tree = product_tree([2, 1])  # root, 2 children, 1 grandchild each
    probs = np.array([[0.9, 0.05], [0.8, 0.1]])
    p = node_probabilities(tree, probs)
    assert np.allclose(p, [1, 0.9, 0.05, 0.72, 0.04])
    assert kept_nodes(tree, p, 3).tolist() == [0, 1, 3]
    free = monotone_costs([1.0] * 64)
    steep = monotone_costs([1.0 + n for n in range(64)])
    assert batch_tree_size([p] * 4, free) == 5  # rows are free: the whole tree
    assert batch_tree_size([p] * 4, steep) == 1  # rows cost a pass each: plain decoding
    cheap = monotone_costs([1.0 + 0.05 * n for n in range(64)])
    one = batch_tree_size([p], cheap)
    eight = batch_tree_size([p] * 8, cheap)
    assert one >= eight  # the bigger the batch, the smaller each tree
    unsure = node_probabilities(tree, np.array([[0.01, 0.01], [0.01, 0.01]]))
    assert batch_tree_size([unsure] * 2, cheap) == 1


# ------------------------------------------------------------------ the API


def test_batch_generate_equals_generate(api_model) -> None:
    model, tokenizer = api_model
    prompts = ["hello there", "a b c d e f g", "x"]
    r = batch_generate(model, tokenizer, prompts, max_tokens=[20, 30, 10])
    for p, text, n in zip(prompts, r.texts, [20, 30, 10], strict=True):
        assert text == generate(model, tokenizer, p, n)
    assert [s.generation_tokens for s in r.stats] == [20, 30, 10]
    assert all(s.finish_reason == "length" and s.tokens_per_pass >= 1 for s in r.stats)
    assert r.passes < 60 and r.tokens_per_s > 0
    stop = r.texts[1][5:8]
    cut = batch_generate(model, tokenizer, prompts[1:2], 30, stop=[stop])
    assert cut.texts[0] == generate(model, tokenizer, prompts[1], 30, stop=[stop])
    assert cut.stats[0].finish_reason == "stop"
    s1 = batch_generate(model, tokenizer, prompts, 15, temp=1.0, seed=5, size_trees=False)
    for i, p in enumerate(prompts):
        assert s1.texts[i] == generate(model, tokenizer, p, 15, temp=1.0, seed=5 + i)
    with pytest.raises(ValueError, match="one entry per prompt"):
        batch_generate(model, tokenizer, prompts, [3, 4])


def test_batch_sizes_stream_trees_and_context_branches_by_cost() -> None:
    """Rows that cost a pass each shrink every draft to its root (plain decoding);
    free rows keep whole trees and branches, which the repeating model accepts."""
    model = repeating_model()
    runs = {}
    for name, costs in (("steep", [float(n) for n in range(1, 65)]), ("free", [1.0] * 64)):
        decoder = BatchDecoder(model)
        decoder.pass_cost = monotone_costs(costs)
        ids = [decoder.add(p, n, tree=product_tree([2, 1]), lookup_branches=4)
               for p, n in zip(PROMPTS, MAXES, strict=True)]
        out = run(decoder)
        for uid, p, n in zip(ids, PROMPTS, MAXES, strict=True):
            assert out[uid] == alone(model, p, n, product_tree([2, 1]), lookup_branches=4)
        runs[name] = decoder
    steep, free = runs["steep"], runs["free"]
    assert free.passes < steep.passes and free.rows > steep.rows
    assert steep.rows <= len(PROMPTS) * steep.passes


@pytest.mark.parametrize("sampled", [False, True])
def test_the_batch_stops_running_the_streams_while_they_do_not_pay(sampled) -> None:
    """Stream rows that cost ten plain passes for a batch: after the first passes the
    batch runs without them (probing now and then); free ones are never paused.  Output
    is unchanged either way (greedy: each prompt alone; sampled: the same seeds give the
    same tokens, run twice)."""
    model = repeating_model()
    runs = {}
    for name, costs in (("dear", [1.0] + [10.0] * 7), ("free", [1.0] * 8)):
        model.cfg.batch_stream_costs = costs
        try:
            outs = []
            for _ in range(2 if sampled else 1):
                decoder = BatchDecoder(model)
                params = SamplingParams(temp=1.0, seed=3) if sampled else None
                ids = [decoder.add(p, n, params, tree=product_tree([2, 1]), lookup_branches=0)
                       for p, n in zip(PROMPTS, MAXES, strict=True)]
                out = run(decoder)
                outs.append([out[u] for u in ids])
            assert decoder.stream_cost(3) == costs[2] and decoder.stream_cost(50) == costs[-1]
        finally:
            model.cfg.batch_stream_costs = None
        if sampled:
            assert outs[0] == outs[1]
        else:
            for got, p, n in zip(outs[0], PROMPTS, MAXES, strict=True):
                assert got == alone(model, p, n, product_tree([2, 1]), lookup_branches=0)
        runs[name] = decoder
    dear, free = runs["dear"], runs["free"]
    assert free.paused_passes == 0
    assert dear.paused_passes > dear.passes // 2


def test_cost_curve_covers_every_row_count_up_to_the_largest_measured() -> None:
    from mlx_specstream.calibrate import cost_curve

    curve = cost_curve({"autoregressive": 2.0, "tree": {"1": 2.0, "2": 3.0, "4": 4.0}})
    assert curve == [1.0, 1.5, 1.75, 2.0]


def test_plain_decoding_in_a_batch_counts_one_token_per_pass_up_to_the_end_token() -> None:
    """The pass that produced the end-of-sequence token produced a token: plain decoding
    reports exactly 1 token per pass, as the single-sequence loops do."""
    model = tiny_model(lora_rank=4, random_lora=True)
    ref = alone(model, PROMPTS[1], 25)
    decoder = BatchDecoder(model, eos_token_ids=[ref[10]])
    decoder.add(PROMPTS[1], 25, speculative=False)
    decoder.add(PROMPTS[0], 25, speculative=False)
    stats = {}
    while decoder.active:
        for ev in decoder.step():
            if ev.finish is not None:
                stats[ev.uid] = ev.state.stats
    assert len(stats) == 2
    for s in stats.values():
        assert s.forward_passes > 0 and s.tokens_per_pass == 1.0
