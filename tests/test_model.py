"""The MSA model against mlx-lm's own forward, and the semantics of the streams."""

from __future__ import annotations

from mlx_specstream.model import build_msa_mask, causal_mask
from tinymodels import tiny_model

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

TOL = 1e-4
PROMPT = mx.array([[1, 5, 7, 9, 11, 2, 3, 40, 41]])


def maxdiff(a: mx.array, b: mx.array) -> float:
    return mx.abs(a - b).max().item()


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("lora", [False, True])
def test_main_logits_equal_mlx_lm(model_type: str, lora: bool) -> None:
    model = tiny_model(model_type, lora_rank=4 if lora else 0, random_lora=lora)
    base = model.base
    ref = base(PROMPT)
    # prefill without cache, with streams on every position and without streams
    with_streams, sl, ex = model(PROMPT, with_exit=True)
    without, none, _ = model(PROMPT, with_streams=False)
    assert none is None
    assert sl.shape == (1, PROMPT.shape[1], 3, base.args.vocab_size)
    assert ex.shape == ref.shape
    assert maxdiff(with_streams, ref) <= TOL
    assert maxdiff(without, ref) <= TOL
    # cached: prefill then single-token steps, streams attached and not
    cache, ref_cache = model.make_cache(), make_prompt_cache(base)
    ours, _, _ = model(PROMPT, cache=cache, stream_rows=mx.array([PROMPT.shape[1] - 1]))
    cache.commit()
    assert maxdiff(ours, base(PROMPT, cache=ref_cache)) <= TOL
    for i, t in enumerate([4, 8, 15, 16]):
        ours, s, _ = model(mx.array([[t]]), cache=cache, with_streams=i % 2 == 0)
        cache.commit()
        assert maxdiff(ours, base(mx.array([[t]]), cache=ref_cache)) <= TOL


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_decode_steps_are_bit_identical_to_mlx_lm(model_type: str) -> None:
    """With the GEMM shim (batch-invariant rows), our decode steps, streams attached or
    not, give exactly mlx-lm's logits: greedy speculative output is mlx-lm's by
    construction, not just within a tolerance."""
    from mlx_specstream.backend import shim

    if not shim.STATUS.active or shim.STATUS.max_m < 4:
        pytest.skip("no batch-invariant GEMM shim on this machine")
    model = tiny_model(model_type, lora_rank=4, random_lora=True)
    base = model.base
    cache, ref_cache = model.make_cache(), make_prompt_cache(base)
    model(PROMPT, cache=cache, with_streams=False)
    cache.commit()
    base(PROMPT, cache=ref_cache)
    for i, t in enumerate([4, 8, 15, 16]):
        ours, _, _ = model(mx.array([[t]]), cache=cache, with_streams=i % 2 == 0)
        cache.commit()
        assert mx.array_equal(ours, base(mx.array([[t]]), cache=ref_cache)).item(), i


def test_tree_pass_and_commit_match_sequential() -> None:
    """Tree nodes see only their ancestors; committing a path equals running it."""
    model = tiny_model("llama")
    base = model.base
    cache, ref_cache = model.make_cache(), make_prompt_cache(base)
    model(PROMPT, cache=cache)
    cache.commit()
    base(PROMPT, cache=ref_cache)
    # tree: 0 -> {1, 2}, 2 -> {3}
    off = cache.offset
    mask = mx.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]).astype(mx.bool_)
    pos = mx.array([off, off + 1, off + 1, off + 2])
    main, _, _ = model(mx.array([[20, 21, 22, 23]]), positions=pos, mask=mask, cache=cache)
    ref = base(mx.array([[20, 22, 23]]), cache=ref_cache)
    assert maxdiff(main[:, [0, 2, 3]], ref) <= TOL
    cache.commit([0, 2, 3])
    nxt, _, _ = model(mx.array([[30]]), cache=cache)
    cache.commit()
    assert maxdiff(nxt, base(mx.array([[30]]), cache=ref_cache)) <= TOL


def _upper_streams(model, h, positions):
    main, sh = model.upper(h, positions)
    return main, model.stream_logits(sh)


def test_stream_j_input_changes_only_streams_ge_j() -> None:
    model = tiny_model("llama", lora_rank=4, random_lora=True)
    L = PROMPT.shape[1]
    pos = mx.arange(L)
    h = model.lower(PROMPT, pos)
    main, streams = _upper_streams(model, h, pos)
    g = model.cfg.num_streams
    P = model.streams.stream_embeddings
    for j in range(g):
        delta = mx.zeros_like(P).at[j].add(1.0)
        model.streams.stream_embeddings = P + delta
        main2, streams2 = _upper_streams(model, h, pos)
        model.streams.stream_embeddings = P
        assert mx.array_equal(main, main2), "streams must never change the main stream"
        diff = mx.abs(streams2 - streams).max(axis=(0, 1, 3))  # per stream
        for k in range(g):
            if k < j:
                assert diff[k].item() == 0.0, f"stream {k} changed when stream {j} did"
            else:
                assert diff[k].item() > 0.0, f"stream {k} ignored stream {j}'s change"


def test_streams_do_not_see_the_future() -> None:
    """Changing the token at position p changes nothing (main or stream) before p."""
    model = tiny_model("llama", lora_rank=4, random_lora=True)
    L = PROMPT.shape[1]
    p = 5
    other = PROMPT.at[0, p].add(1)
    a_main, a_s, a_e = model(PROMPT, with_exit=True)
    b_main, b_s, b_e = model(other, with_exit=True)
    assert mx.array_equal(a_main[:, :p], b_main[:, :p])
    assert mx.array_equal(a_s[:, :p], b_s[:, :p])
    assert mx.array_equal(a_e[:, :p], b_e[:, :p])
    assert maxdiff(a_s[:, p:], b_s[:, p:]) > 0
    assert L > p


def test_msa_mask_shape_and_blocks() -> None:
    m = build_msa_mask(causal_mask(3), cached=2, stream_rows=mx.array([0, 2]), num_streams=2)
    assert m.shape == (3 + 4, 2 + 3 + 4)
    m = m.tolist()
    # main rows never see streams
    assert not any(any(r[5:]) for r in m[:3])
    # stream (s=1 -> host token 2, j=1) sees cache, main 0..2, its own streams 0..1
    assert m[3 + 3] == [True, True, True, True, True, False, False, True, True]
    # stream (s=0 -> host token 0, j=0) sees main 0 and itself only
    assert m[3] == [True, True, True, False, False, True, False, False, False]


def test_extra_parameters_budget() -> None:
    model = tiny_model("llama")
    hidden = model.args.hidden_size
    n = sum(v.size for v in model.stream_parameters().values())
    assert n == model.cfg.extra_parameters(hidden)
    assert n <= 25 * hidden


@pytest.mark.parametrize("base,scale,heads", [(100000.0, 1.0, 9), (1e6, 0.5, 2)])
def test_rotary_tables_are_bit_identical_to_fast_rope(base: float, scale: float,
                                                      heads: int) -> None:
    """The CPU path rotates with cos/sin tables shared by the layers of a pass: every
    value equals mx.fast.rope's, per-row offsets (a tree, a batch) and mlx-lm's one offset
    per call alike; a second call with the same positions reuses the tables."""
    from mlx_specstream import model as M

    import mlx.nn as nn
    import numpy as np

    if not M._compiled():
        pytest.skip("the tables are the CPU path (compiled rotary embedding)")
    D = 64
    rope = nn.RoPE(D, traditional=False, base=base, scale=scale)
    rng = np.random.default_rng(0)
    for B, L, start in ((1, 1, 0), (1, 7, 250), (3, 5, 31000)):
        x = mx.random.normal((B, L, heads, D), key=mx.random.key(L)) * 3
        pos = mx.array(rng.integers(start, start + 50, (B, L)).astype(np.int32))
        got = M._rope(rope, x, pos)
        ref = mx.fast.rope(x.reshape(B * L, heads, 1, D), D, traditional=False, base=base,
                           scale=scale, offset=pos.reshape(-1)).reshape(B, L, heads, D)
        assert np.array_equal(np.array(got), np.array(ref))
        assert M._ROPE_TABLES[0][0] is pos
        kept = len(M._ROPE_TABLES)
        again = M._rope(rope, x + 1, pos)  # the same positions: the same tables
        assert len(M._ROPE_TABLES) == kept and M._ROPE_TABLES[0][0] is pos
        assert np.array_equal(np.array(again), np.array(M._rope(rope, x + 1, pos + 0)))
        consecutive = mx.arange(start, start + L)[None]
        one = M._rope(rope, x[:1], consecutive)
        lm = rope(x[:1].transpose(0, 2, 1, 3), offset=start).transpose(0, 2, 1, 3)
        assert np.array_equal(np.array(one), np.array(lm))
