"""Sampling policy with an exact output distribution: target distributions, drafting
without replacement and recursive rejection sampling over a draft tree.

Everything here is pure policy, testable without a model:

* ``SamplingParams`` holds mlx-lm's sampling options (same names as its generate API).
* ``target_probs`` turns logits into the distribution a token is sampled from, in
  mlx-lm's order: logits processors (repetition penalty, on each row's own history),
  log-softmax, the top-p / min-p / top-k filters of ``mlx_lm.sample_utils`` on the
  temperature-1 log-probabilities, then temperature and softmax.  That is exactly the
  law of ``make_sampler(temp, top_p, min_p, top_k=...)`` after
  ``make_logits_processors(repetition_penalty=...)``.  The streams' proposals are the
  same function of the stream logits.
* ``draft`` draws the candidates of each depth from its proposal *without
  replacement* (Gumbel-top-k), in draw order.
* ``accept_sampled`` walks the tree with recursive rejection sampling without
  replacement, so the emitted tokens follow the target distribution exactly, whatever
  the proposals are.

Why the result is exact: at a node with residual target ``r``, the children's tokens
``x_1, x_2, ...`` were drawn without replacement from ``q``, so ``x_i`` given the
earlier draws is distributed as ``q_i`` = ``q`` with the earlier draws removed and
renormalised.  Accepting ``x_i`` with probability ``min(1, r(x_i) / q_i(x_i))`` and
otherwise continuing with ``r <- normalise(max(r - q_i, 0))`` is the classic
speculative-sampling step, whose output law is ``r``; by induction over the children
(and the final draw from the last residual) the emitted token is distributed as
``p[u]``, and by induction over the depths the whole emitted sequence is distributed
as autoregressive sampling.  The depth-``d`` candidates are drawn from the host's
stream ``d`` independently of the tokens above them, which is what the argument needs.
A context or corpus branch is a function of the context: at a node on it, its token
``y`` is tested first as a proposal with all its mass on ``y`` (accepted with
probability ``r(y)``, else ``r <- normalise(r without y)``), the same step with
``q = delta_y``; the streams' candidates follow, still independent of it.

Randomness: one ``numpy.random.Generator`` per generation, seeded by
``SamplingParams.seed`` (None: fresh OS entropy).  Device-side draws (``draft_on_device``,
autoregressive sampling) take an ``mx.random.key`` drawn from that generator, so one
seed fixes every token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from .tree import Tree

History = Sequence[int] | np.ndarray | mx.array


@dataclass(frozen=True)
class SamplingParams:
    """mlx-lm's sampling options.  ``temp == 0`` is greedy (argmax after the processors).

    top_p: nucleus filter, 1.0 = off.  top_k: keep the k most likely, 0 = off.
    min_p: keep tokens with probability >= min_p * max probability, 0 = off.
    repetition_penalty: mlx-lm's sign-aware multiplicative penalty on the last
    ``repetition_context_size`` tokens; None or 1.0 = off.
    seed: seed of the generation's random generator; None = fresh entropy."""

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 20
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def real(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def integer(x: object) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if not real(self.temp) or self.temp < 0:
            raise ValueError(f"temp must be a finite number >= 0, got {self.temp!r}")
        if not real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not integer(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        rp = self.repetition_penalty
        if rp is not None and (not real(rp) or rp <= 0):
            raise ValueError(f"repetition_penalty must be a number > 0, got {rp!r}")
        if not integer(self.repetition_context_size) or self.repetition_context_size < 1:
            raise ValueError(
                "repetition_context_size must be an integer >= 1, got "
                f"{self.repetition_context_size!r}"
            )
        if self.seed is not None and (not integer(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty is not None and self.repetition_penalty != 1.0

    @property
    def plain_greedy(self) -> bool:
        """True when the output is the plain model's argmax (the greedy decoders apply)."""
        return self.greedy and not self.penalised

    @property
    def history_size(self) -> int:
        """How many trailing tokens of a row's history the processors read (0: none)."""
        return self.repetition_context_size if self.penalised else 0

    def logits_processors(self) -> list:
        if not self.penalised:
            return []
        return make_logits_processors(
            repetition_penalty=float(self.repetition_penalty),
            repetition_context_size=int(self.repetition_context_size),
        )

    def make_rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


# ---------------------------------------------------------------- target distributions


def _as_rows(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits[None] if logits.ndim == 1 else logits


def processed_logits(
    logits: mx.array, history_per_row: Sequence[History] | None, params: SamplingParams
) -> mx.array:
    """(n, V) float32 logits after mlx-lm's logits processors, row i seeing its own
    token history (context + path to the tree node)."""
    logits = _as_rows(logits)
    procs = params.logits_processors()
    if not procs:
        return logits
    if history_per_row is None or len(history_per_row) != logits.shape[0]:
        raise ValueError("the repetition penalty needs one token history per row")
    rows = []
    for i, hist in enumerate(history_per_row):
        toks = hist if isinstance(hist, mx.array) else mx.array(np.asarray(hist, np.int32))
        row = logits[i : i + 1]
        for proc in procs:
            row = proc(toks.reshape(-1), row)
        rows.append(row)
    return mx.concatenate(rows, axis=0)


def filtered_logprobs(
    logits: mx.array, history_per_row: Sequence[History] | None, params: SamplingParams
) -> mx.array:
    """(n, V) temperature-1 log-probabilities after the processors and mlx-lm's
    top-p, min-p and top-k filters (in ``make_sampler``'s order); filtered = -inf."""
    x = processed_logits(logits, history_per_row, params)
    lp = x - mx.logsumexp(x, axis=-1, keepdims=True)
    vocab = lp.shape[-1]
    if 0 < params.top_p < 1.0:
        lp = apply_top_p(lp, params.top_p)
    if params.min_p != 0.0:
        lp = apply_min_p(lp, params.min_p)
    if 0 < params.top_k < vocab:
        lp = apply_top_k(lp, int(params.top_k))
    return lp


def target_probs(
    logits: mx.array, history_per_row: Sequence[History] | None, params: SamplingParams
) -> mx.array:
    """(n, V) float32 distributions the tokens after each row are sampled from.

    temp > 0: softmax(filtered log-probs / temp).  temp == 0: one-hot at the argmax
    of the processed logits (greedy).  Used both for the main stream (the target ``p``)
    and for the streams (the proposals ``q``)."""
    if params.greedy:
        x = processed_logits(logits, history_per_row, params)
        idx = mx.argmax(x, axis=-1, keepdims=True)
        return (mx.arange(x.shape[-1])[None] == idx).astype(mx.float32)
    lp = filtered_logprobs(logits, history_per_row, params)
    return mx.softmax(lp * (1.0 / params.temp), axis=-1)


# ------------------------------------------------------------------------- drafting


def draft(
    q: np.ndarray, topk: Sequence[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates per depth drawn from ``q[d]`` without replacement, in draw order.

    q: (g, V) proposals; topk: number of candidates per depth (len g).
    Returns (tokens, valid), both (g, kmax) with kmax = max(topk): Gumbel-top-k on
    log q, which is sequential sampling without replacement.  Tokens with q = 0 are
    never drawn: when fewer than topk[d] tokens have mass (or beyond topk[d]), the
    remaining entries are padding, token 0 with valid False.  A tree must not accept
    a padded candidate; ``accept_sampled`` never does (the proposal has no mass left
    for it)."""
    q = np.asarray(q, dtype=np.float64)
    g, vocab = q.shape
    if len(topk) != g:
        raise ValueError(f"topk has {len(topk)} entries for {g} proposal rows")
    kmax = max(topk) if len(topk) else 0
    tokens = np.zeros((g, kmax), dtype=np.int64)
    valid = np.zeros((g, kmax), dtype=bool)
    for d in range(g):
        support = np.flatnonzero(q[d] > 0)
        keys = np.log(q[d, support]) + rng.gumbel(size=support.shape[0])
        k = min(int(topk[d]), support.shape[0])
        chosen = support[np.argsort(-keys, kind="stable")[:k]]
        tokens[d, :k] = chosen
        valid[d, :k] = True
    return tokens, valid


def random_key(rng: np.random.Generator) -> mx.array:
    """An ``mx.random`` key drawn from the generation's numpy generator."""
    return mx.random.key(int(rng.integers(0, 2**63)))


def draft_on_device(q: mx.array, kmax: int, key: mx.array) -> mx.array:
    """``draft`` on the device: (g, V) proposals -> (g, kmax) candidates without
    replacement, in draw order (Gumbel-top-k on log q).  Padding (when fewer than kmax
    tokens have mass) holds arbitrary zero-mass tokens, never accepted."""
    keys = mx.log(q) + mx.random.gumbel(q.shape, key=key)
    if kmax == 1:
        return mx.argmax(keys, axis=-1, keepdims=True)
    part = mx.argpartition(-keys, kth=kmax - 1, axis=-1)[..., :kmax]
    order = mx.argsort(-mx.take_along_axis(keys, part, axis=-1), axis=-1)
    return mx.take_along_axis(part, order, axis=-1)


# ------------------------------------------------------------------------ acceptance


def sample_from(r: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from the (not necessarily normalised) distribution ``r``; tokens with
    r = 0 are never drawn."""
    cs = np.cumsum(np.asarray(r, dtype=np.float64))
    total = cs[-1]
    if not total > 0:
        raise ValueError("cannot sample from a distribution with no mass")
    i = int(np.searchsorted(cs, rng.random() * total, side="right"))
    return min(i, cs.shape[0] - 1)


def _candidates(tree: Tree, node_tokens: np.ndarray, streams: int
                ) -> dict[tuple[int, int], int]:
    """(depth, rank) -> token, read off the tree's stream nodes (ids below ``streams``)."""
    out: dict[tuple[int, int], int] = {}
    for i in range(1, streams):
        key = (int(tree.depth[i]), int(tree.rank[i]))
        tok = int(node_tokens[i])
        if out.setdefault(key, tok) != tok:
            raise ValueError(f"nodes with depth/rank {key} carry different tokens")
    return out


def branch_children(tree_size: int, branch: Sequence[int]) -> np.ndarray:
    """(n,) int: each node's child on the deterministic branch (-1: none).  ``branch``
    is a path from the root (``Draft.branch``: the root, then the branch's nodes)."""
    child = -np.ones(tree_size, dtype=np.int32)
    for u, c in zip(branch[:-1], branch[1:], strict=True):
        child[u] = c
    return child


def accept_sampled(
    tree: Tree,
    node_tokens: np.ndarray,
    p: np.ndarray,
    q: np.ndarray,
    rng: np.random.Generator,
    cands: np.ndarray | None = None,
    streams: int | None = None,
    branch: Sequence[int] = (),
) -> tuple[list[int], int]:
    """Recursive rejection sampling without replacement over a draft tree.

    node_tokens: (n,) token of each node; p: (n, V) target distribution of the token
    after each node; q: (>= max_depth, V) proposal of each depth (row d-1 for depth d);
    cands: optional (>= max_depth, kmax) candidates in draw order (row d-1: depth d).
    Without ``cands`` they are read off the tree, which then must hold every rank
    below each child's rank at that depth (true of product trees).

    streams: the nodes with smaller ids are the streams' draws (default: all); the
    others are deterministic.  branch: a path from the root whose tokens are a
    deterministic function of the context (a prompt-lookup or corpus chain); a node on
    it tests its branch child first, as a proposal of all its mass on one token ``y``:
    accepted with probability ``r(y)``, else ``y`` leaves the residual.  The stream
    children follow in rank order.  Both are speculative-sampling steps, so the
    emitted token still follows the residual's law.

    Returns the accepted path (node ids from the root) and the next token, drawn from
    the residual at the last accepted node.  The emitted tokens (path after the root,
    then the next token) follow ``p`` exactly; see the module docstring."""
    streams = tree.size if streams is None else streams
    known = None if cands is not None else _candidates(tree, node_tokens, streams)
    fixed = branch_children(tree.size, branch)
    path = [0]
    u = 0
    while True:
        r = np.asarray(p[u], dtype=np.float64)
        r = r / r.sum()
        nxt = -1
        if fixed[u] >= 0:
            y = int(node_tokens[fixed[u]])
            if rng.random() < r[y]:
                nxt = int(fixed[u])
            elif r[y] < 1.0:
                r[y] = 0.0
                r = r / r.sum()
        kids = sorted((c for c in tree.children[u] if c < streams),
                      key=lambda c: int(tree.rank[c]))
        if kids and nxt < 0:
            d = int(tree.depth[u])  # children are at depth d + 1: proposal row d
            qd = np.array(q[d], dtype=np.float64)
            removed = 0  # candidates of ranks < removed are out of qd
            for c in kids:
                rank = int(tree.rank[c])
                while removed < rank:
                    if cands is not None:
                        prev = int(cands[d, removed])
                    else:
                        if (d + 1, removed) not in known:
                            raise ValueError(
                                f"rank {removed} of depth {d + 1} is not in the tree: pass cands"
                            )
                        prev = known[(d + 1, removed)]
                    qd[prev] = 0.0
                    removed += 1
                mass = qd.sum()
                if not mass > 0:
                    break  # the rest are padding: q had fewer tokens with mass
                x = int(node_tokens[c])
                qx = qd[x] / mass
                if not qx > 0:
                    continue  # not a genuine draw (padding); never accept it
                if rng.random() * qx < r[x]:
                    nxt = c
                    break
                r = np.maximum(r - qd / mass, 0.0)
                r = r / r.sum()
                qd[x] = 0.0
                removed = rank + 1
        if nxt < 0:
            return path, sample_from(r, rng)
        path.append(nxt)
        u = nxt
