"""The GEMM shim in front of OpenBLAS: every layout MLX uses gives numpy's result, and a
row's result does not depend on how many rows share the call (up to the skinny limit)."""

from __future__ import annotations

from mlx_specstream.backend import align, shim

import mlx.core as mx
import numpy as np
import pytest

needs_shim = pytest.mark.skipif(not shim.STATUS.active, reason="no GEMM shim on this machine")


@needs_shim
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 17, 300])
@pytest.mark.parametrize("k", [5, 64, 131])
def test_matmul_layouts_match_numpy(m: int, k: int) -> None:
    rng = np.random.default_rng(m * 1000 + k)
    n = 203
    a = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    want = a.astype(np.float64) @ w.T.astype(np.float64)
    A, W = mx.array(a), mx.array(w)
    for got in (A @ W.T, (W @ A.T).T, A @ mx.array(np.ascontiguousarray(w.T)),
                mx.array(np.ascontiguousarray(a.T)).T @ W.T):
        np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-3)


@needs_shim
def test_accumulating_matmul_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 40)).astype(np.float32)
    w = rng.standard_normal((70, 40)).astype(np.float32)
    c = rng.standard_normal((3, 70)).astype(np.float32)
    got = mx.addmm(mx.array(c), mx.array(a), mx.array(w).T, alpha=0.5, beta=2.0)
    np.testing.assert_allclose(np.array(got), 0.5 * a @ w.T + 2.0 * c, rtol=1e-4, atol=1e-3)


def _skinny_limit() -> int:
    """Rows the skinny kernels take; skips the test when they are off."""
    if shim.STATUS.max_m < 2:
        pytest.skip("skinny kernel off")
    return shim.STATUS.max_m


@needs_shim
@pytest.mark.parametrize("n, k", [(1000, 576), (203, 131)])
def test_rows_are_batch_invariant(n: int, k: int) -> None:
    """Up to the skinny limit, each output row is summed in the same order whatever the
    number of rows (and whichever register tile computes it, edges and tails included):
    a tree node's logits equal the ones a 1-token pass would give."""
    limit = _skinny_limit()
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((limit, k)).astype(np.float32))
    w = mx.array(rng.standard_normal((n, k)).astype(np.float32))
    full = np.array(x @ w.T)
    for m in range(1, limit + 1):
        part = np.array(x[:m] @ w.T)
        assert np.array_equal(part, full[:m])
    assert np.array_equal(np.array(x[3:4] @ w.T), full[3:4])


@needs_shim
def test_small_attention_products_are_batch_invariant() -> None:
    """probabilities @ values (B not transposed, small): each row is the same whatever
    the number of rows, as for x @ W.T."""
    limit = _skinny_limit()
    rng = np.random.default_rng(2)
    p = mx.array(rng.random((limit, 261)).astype(np.float32))
    v = mx.array(rng.standard_normal((261, 64)).astype(np.float32))
    full = np.array(p @ v)
    np.testing.assert_allclose(full, np.array(p).astype(np.float64) @ np.array(v), rtol=1e-4,
                               atol=1e-4)
    for m in range(1, limit + 1):
        assert np.array_equal(np.array(p[:m] @ v), full[:m])


def _pass_equals_one_token_passes(model, prompt: list[int], new: list[int],
                                  streams: bool) -> None:
    """The main logits of ``new`` in one causal pass (streams attached or not) are
    bit-identical to one-token passes without streams, each after the same prefill."""
    from mlx_specstream.model import causal_mask

    def prefilled():
        cache = model.make_cache()
        model(mx.array(prompt), cache=cache, with_streams=False)
        cache.commit()
        return cache

    k = len(new)
    cache = prefilled()
    off = cache.offset
    many, stream_logits, _ = model(mx.array(new), positions=mx.arange(off, off + k),
                                   mask=causal_mask(k), cache=cache, with_streams=streams)
    assert (stream_logits is not None) == streams
    many = np.array(many[0])
    cache = prefilled()
    for i, t in enumerate(new):
        one = model(mx.array([t]), positions=mx.array([off + i]), cache=cache,
                    with_streams=False)[0]
        cache.commit()
        assert np.array_equal(np.array(one[0, 0]), many[i]), f"token {i}"


@needs_shim
def test_a_multi_token_pass_equals_one_token_passes() -> None:
    """With the shim, the logits of k new tokens in one causal pass are bit-identical to
    k one-token passes (k up to the skinny limit): verifying a draft computes exactly what
    autoregressive decoding would."""
    from tinymodels import tiny_model

    k = min(shim.STATUS.max_m, 4)
    if k < 2:
        pytest.skip("skinny kernel off")
    _pass_equals_one_token_passes(tiny_model("llama", seed=5), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3],
                                  [7, 11, 13, 17][:k], streams=False)


@needs_shim
def test_a_draft_chain_pass_with_streams_verifies_exactly() -> None:
    """A 4-node chain with its 3 streams per node (16 rows in the MSA layers): the main
    rows' logits are bit-identical to one-token passes without streams."""
    from tinymodels import tiny_model

    if shim.STATUS.max_m < 16:
        pytest.skip("skinny limit below 16 rows")
    model = tiny_model("llama", seed=6, lora_rank=4, random_lora=True)
    _pass_equals_one_token_passes(model, [2, 7, 1, 8, 2, 8, 1, 8], [3, 14, 15, 9], streams=True)


@needs_shim
@pytest.mark.parametrize("k", [150, 576])  # rows one tile at a time / shared multi-column tiles
def test_products_do_not_depend_on_the_weights_alignment(k: int) -> None:
    """The same weights at every 4-byte offset of a cache line give bit-identical products
    for 1 to 16 rows (what lets align_weights move a loaded model's weights)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((70, k)).astype(np.float32)
    x = mx.array(rng.standard_normal((16, k)).astype(np.float32))
    ref = np.array(x @ mx.array(w).T)
    for off in range(16):
        buf = mx.zeros((w.size + 16,))
        buf[off : off + w.size] = mx.array(w.reshape(-1))
        moved = buf[off : off + w.size].reshape(w.shape)
        for m in (1, 3, 4, 16):
            assert np.array_equal(np.array(x[:m] @ moved.T), ref[:m]), (off, m)


@needs_shim
def test_aligned_weights_keep_the_logits_and_survive_a_save(tmp_path) -> None:
    """align_weights moves the weights to 64-byte boundaries; the logits stay bit-identical
    and the moved arrays save and load like any others."""
    from tinymodels import tiny_model

    from mlx.utils import tree_flatten

    model = tiny_model("llama", seed=8, lora_rank=4, random_lora=True)
    tokens = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    before = [np.array(a) for a in model(tokens, with_exit=True)]
    moved = align.align_weights(model, min_size=256)
    params = dict(tree_flatten(model.parameters()))
    big = [w for w in params.values() if w.ndim == 2 and w.size >= 256]
    assert moved > 0 and all(align._address(w) % 64 == 0 for w in big)
    after = [np.array(a) for a in model(tokens, with_exit=True)]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    mx.save_safetensors(str(tmp_path / "w.safetensors"), params)
    back = mx.load(str(tmp_path / "w.safetensors"))
    assert all(np.array_equal(np.array(back[k]), np.array(v)) for k, v in params.items())
