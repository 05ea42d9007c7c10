"""The GEMM shim in front of OpenBLAS: every layout MLX uses gives numpy's result, and a
row's result does not depend on how many rows share the call (up to the skinny limit)."""

from __future__ import annotations

from mlx_specstream import _blas

import mlx.core as mx
import numpy as np
import pytest

needs_shim = pytest.mark.skipif(_blas.SHIM is None, reason="no GEMM shim on this machine")


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


@needs_shim
def test_rows_are_batch_invariant() -> None:
    """Up to the skinny limit, each output row is summed in the same order whatever the
    number of rows: a tree node's logits equal the ones a 1-token pass would give."""
    limit = _blas.SHIM_MAX_M
    if limit < 2:
        pytest.skip("skinny kernel off")
    rng = np.random.default_rng(1)
    x = mx.array(rng.standard_normal((limit, 576)).astype(np.float32))
    w = mx.array(rng.standard_normal((1000, 576)).astype(np.float32))
    full = np.array(x @ w.T)
    for m in range(1, limit + 1):
        part = np.array(x[:m] @ w.T)
        assert np.array_equal(part, full[:m])
    assert np.array_equal(np.array(x[3:4] @ w.T), full[3:4])
