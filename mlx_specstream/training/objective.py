"""The n-gram training objective of speculative streaming.

    L = alpha0 * CE(main predicts t+1) + sum_j alpha_j * CE(stream j predicts t+1+j)

plus, for the pruning adapter, the next-token CE of its early-exit logits.  Each term
is a mean over its own target positions.  Targets are the tokens flagged in
``targets`` (prompt and padding positions are not); stream j (1-based) at position t
predicts token t+1+j, so it has j fewer target positions than the main stream.

The trainer computes the LM head only at target positions: ``sparse_targets`` turns a
batch's target flags into the index triples it needs.  Data and trainer both use it, so it
lives here rather than in either of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np


@dataclass
class Terms:
    """Per-term sums: cross-entropy, correct top-1 predictions and target counts."""

    loss: mx.array  # scalar, the weighted objective (differentiable)
    ce: dict[str, mx.array]  # name -> summed CE
    correct: dict[str, mx.array]  # name -> number of top-1 hits
    count: dict[str, mx.array]  # name -> number of targets


def shifted_ce(
    logits: mx.array, tokens: mx.array, targets: mx.array, shift: int
) -> tuple[mx.array, mx.array, mx.array]:
    """Summed CE, top-1 hits and count of ``logits[:, t]`` predicting ``tokens[:, t+shift]``.

    logits: (B, T, V); tokens (B, T) int; targets (B, T) bool."""
    T = tokens.shape[1]
    if T <= shift:
        z = mx.array(0.0)
        return z, z, z
    lg = logits[:, : T - shift]
    y = tokens[:, shift:]
    w = targets[:, shift:].astype(mx.float32)
    ce = nn.losses.cross_entropy(lg.astype(mx.float32), y, reduction="none")
    hit = (mx.argmax(lg, axis=-1) == y).astype(mx.float32)
    return (ce * w).sum(), mx.stop_gradient((hit * w).sum()), w.sum()


def stream_names(num_streams: int) -> list[str]:
    return [f"s{j}" for j in range(1, num_streams + 1)]


def ngram_terms(
    tokens: mx.array,
    targets: mx.array,
    main_logits: mx.array | None,
    stream_logits: mx.array | None,
    exit_logits: mx.array | None,
    alpha0: float = 1.0,
    alphas: list[float] | None = None,
    exit_weight: float = 1.0,
) -> Terms:
    """The objective and its bookkeeping.  stream_logits: (B, T, gamma, V).  A None
    input contributes nothing (e.g. main logits in lossless training, where the main
    stream is frozen and its CE is a constant)."""
    ce: dict[str, mx.array] = {}
    correct: dict[str, mx.array] = {}
    count: dict[str, mx.array] = {}
    loss = mx.array(0.0)

    def add(name: str, logits: mx.array, shift: int, weight: float) -> None:
        nonlocal loss
        s, h, n = shifted_ce(logits, tokens, targets, shift)
        ce[name], correct[name], count[name] = s, h, n
        if weight:
            loss = loss + weight * s / mx.maximum(n, 1.0)

    if main_logits is not None:
        add("main", main_logits, 1, alpha0)
    if stream_logits is not None:
        g = stream_logits.shape[2]
        alphas = list(alphas) if alphas is not None else [0.1] * g
        if len(alphas) != g:
            raise ValueError(f"{len(alphas)} stream weights for {g} streams")
        for j, name in enumerate(stream_names(g)):
            add(name, stream_logits[:, :, j], j + 2, alphas[j])
    if exit_logits is not None:
        add("exit", exit_logits, 1, exit_weight)
    return Terms(loss, ce, correct, count)


@dataclass
class SparseTargets:
    """The (batch, position, stream) triples that have a target, for computing the LM
    head only where a loss is taken (no prompt or padding positions)."""

    rows: mx.array  # (S,) positions that carry streams
    flat: mx.array  # (N,) indices into the flattened (B, S, gamma) stream states
    labels: mx.array  # (N,) target tokens
    stream: mx.array  # (N,) stream index 0..gamma-1
    exit_flat: mx.array  # (M,) indices into flattened (B, T) for next-token targets
    exit_labels: mx.array  # (M,)


def sparse_targets(tokens: np.ndarray, targets: np.ndarray, g: int) -> SparseTargets:
    """The target triples of a (B, T) batch with ``g`` streams (see ``SparseTargets``)."""
    B, T = tokens.shape
    any_t = targets.any(axis=0)
    has = np.zeros(T, dtype=bool)
    for j in range(1, g + 1):
        if T - 1 - j > 0:
            has[: T - 1 - j] |= any_t[1 + j :]
    rows = np.nonzero(has)[0]
    S = len(rows)
    flat, labels, stream = [], [], []
    for j in range(1, g + 1):
        pos = rows + 1 + j
        ok = pos < T
        valid = np.zeros((B, S), dtype=bool)
        valid[:, ok] = targets[:, pos[ok]]
        b, si = np.nonzero(valid)
        flat.append((b * S + si) * g + (j - 1))
        labels.append(tokens[b, rows[si] + 1 + j])
        stream.append(np.full(len(b), j - 1))
    eb, et = np.nonzero(targets[:, 1:])
    return SparseTargets(
        rows=mx.array(rows.astype(np.int32)),
        flat=mx.array(np.concatenate(flat).astype(np.int32)),
        labels=mx.array(np.concatenate(labels).astype(np.int32)),
        stream=mx.array(np.concatenate(stream).astype(np.int32)),
        exit_flat=mx.array((eb * T + et).astype(np.int32)),
        exit_labels=mx.array(tokens[eb, et + 1].astype(np.int32)),
    )
