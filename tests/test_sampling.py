"""Sampling with an exact output distribution.

Statistical tests use chi-square tests at a false-alarm rate ALPHA = 1e-3 each, with
fixed seeds: they are deterministic in CI, and a correct implementation fails one with
probability 1e-3 per test only over the choice of seeds.  Cells with small expected
counts are merged into one cell before testing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping

import mlx_specstream  # noqa: F401  (BLAS set-up before mlx.core)
from mlx_specstream import stream_generate
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.decode import DecodeStats, speculative_steps
from mlx_specstream.generate import _encode
from mlx_specstream.model import SpecStreamModel
from mlx_specstream.sampled import sampled_autoregressive_steps, sampled_speculative_steps
from mlx_specstream.sampling import (
    SamplingParams,
    accept_sampled,
    draft,
    draft_on_device,
    random_key,
    target_probs,
)
from mlx_specstream.tree import follow_chain, make_tree, product_tree, with_chain
from tinymodels import tiny_base, tiny_model

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors, make_sampler

ALPHA = 1e-3


# --------------------------------------------------------------------- chi-square tools


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df), integer df (closed forms for even / odd df)."""
    if x <= 0:
        return 1.0
    y = x / 2.0
    if df % 2 == 0:
        term = math.exp(-y)
        total = term
        for i in range(1, df // 2):
            term *= y / i
            total += term
        return min(total, 1.0)
    total = math.erfc(math.sqrt(y))
    term = math.exp(-y) * math.sqrt(y) / math.gamma(1.5)
    for i in range(1, (df + 1) // 2):
        total += term
        term *= y / (i + 0.5)
    return min(total, 1.0)


def goodness_of_fit(counts: Counter, probs: Mapping[Hashable, float], min_expected: float = 5.0):
    """Chi-square test of observed counts against exact probabilities.
    Returns (statistic, df, p-value); observing a zero-probability cell is an error."""
    n = sum(counts.values())
    for k, c in counts.items():
        assert probs.get(k, 0.0) > 0, f"observed {c} x {k}, which has probability 0"
    stat, rest_o, rest_e, cells = 0.0, 0, 0.0, 0
    for k, p in probs.items():
        e, o = n * p, counts.get(k, 0)
        if e < min_expected:
            rest_o, rest_e = rest_o + o, rest_e + e
        else:
            stat += (o - e) ** 2 / e
            cells += 1
    if rest_e > 0:
        stat += (rest_o - rest_e) ** 2 / rest_e
        cells += 1
    df = cells - 1
    return stat, df, chi2_sf(stat, df)


def two_sample(a: Counter, b: Counter, min_count: int = 10):
    """Chi-square two-sample (homogeneity) test; cells with fewer than ``min_count``
    observations in both samples together are merged.  Returns (statistic, df, p)."""
    na, nb = sum(a.values()), sum(b.values())
    ka, kb = math.sqrt(nb / na), math.sqrt(na / nb)
    stat, cells, ra, rb = 0.0, 0, 0, 0
    for k in set(a) | set(b):
        x, y = a.get(k, 0), b.get(k, 0)
        if x + y < min_count:
            ra, rb = ra + x, rb + y
        else:
            stat += (ka * x - kb * y) ** 2 / (x + y)
            cells += 1
    if ra + rb > 0:
        stat += (ka * ra - kb * rb) ** 2 / (ra + rb)
        cells += 1
    df = cells - 1
    return stat, df, chi2_sf(stat, df)


def test_chi2_sf_known_quantiles() -> None:
    for x, df in [(3.841, 1), (5.991, 2), (7.815, 3), (11.070, 5), (124.342, 100)]:
        assert abs(chi2_sf(x, df) - 0.05) < 1e-3


# ----------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "kw",
    [
        {"temp": -0.1},
        {"temp": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"top_k": 2.5},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
        {"repetition_context_size": 0},
        {"seed": -1},
    ],
)
def test_invalid_params_are_clear_errors(kw) -> None:
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)


def test_greedy_and_penalty_flags() -> None:
    assert SamplingParams().plain_greedy
    assert SamplingParams(repetition_penalty=1.0).plain_greedy
    assert not SamplingParams(repetition_penalty=1.2).plain_greedy
    assert not SamplingParams(temp=0.5).plain_greedy


# ------------------------------------------------------ target = mlx-lm's sampler law


@pytest.mark.parametrize(
    "kw",
    [
        {"temp": 0.7, "top_k": 3},
        {"temp": 1.0, "top_p": 0.7},
        {"temp": 1.3, "min_p": 0.2},
        {"temp": 0.9, "top_p": 0.9, "min_p": 0.05, "top_k": 5},
    ],
)
def test_target_probs_is_the_law_of_mlx_lm_sampler(kw) -> None:
    """20000 draws of mlx-lm's make_sampler vs target_probs (goodness of fit)."""
    V, N = 10, 20000
    logits = mx.array(np.random.default_rng(1).normal(size=V).astype(np.float32) * 2)
    p = np.array(target_probs(logits, None, SamplingParams(**kw))[0], dtype=np.float64)
    assert abs(p.sum() - 1) < 1e-5
    lp = logits - mx.logsumexp(logits)
    mx.random.seed(0)
    sampler = make_sampler(
        kw["temp"], kw.get("top_p", 0.0), kw.get("min_p", 0.0), top_k=kw.get("top_k", 0)
    )
    draws = np.array(sampler(mx.broadcast_to(lp, (N, V))))
    stat, df, pval = goodness_of_fit(Counter(draws.tolist()), dict(enumerate(p)))
    assert pval > ALPHA, (stat, df)


def test_filters_and_penalty_semantics() -> None:
    logits = mx.array([[3.0, 2.0, 1.0, 0.0, -1.0, 2.5]])
    p = np.array(target_probs(logits, None, SamplingParams(temp=1.0, top_k=2))[0])
    assert set(np.flatnonzero(p)) == {0, 5}
    p = np.array(target_probs(logits, None, SamplingParams(temp=1.0, min_p=0.5))[0])
    assert set(np.flatnonzero(p)) == {0, 5}  # e^-0.5 >= 0.5 > e^-1
    # the penalty reads each row's own history
    two = mx.concatenate([logits, logits])
    params = SamplingParams(temp=1.0, repetition_penalty=3.0)
    p = np.array(target_probs(two, [[0], [1, 5]], params))
    assert p[0, 0] < p[1, 0] and p[0, 5] > p[1, 5]
    assert (
        np.argmax(
            np.array(
                target_probs(two, [[0], [1, 5]], SamplingParams(temp=0.0, repetition_penalty=3.0))
            )[0]
        )
        == 5
    )


# ---------------------------------------------------------------------------- drafting


def pair_law(q: np.ndarray) -> dict:
    """Exact law of the first two draws without replacement from q."""
    return {
        (a, b): q[a] * q[b] / (1 - q[a])
        for a in range(len(q))
        for b in range(len(q))
        if a != b and q[a] > 0 and q[b] > 0
    }


Q_DRAFT = np.array([0.35, 0.25, 0.0, 0.2, 0.15, 0.05])


def test_draft_is_without_replacement_in_draw_order() -> None:
    rng = np.random.default_rng(7)
    pairs = Counter()
    for _ in range(20000):
        toks, valid = draft(Q_DRAFT[None], [2], rng)
        assert valid.all()
        pairs[(int(toks[0, 0]), int(toks[0, 1]))] += 1
    stat, df, pval = goodness_of_fit(pairs, pair_law(Q_DRAFT))
    assert pval > ALPHA, (stat, df)


def test_draft_on_device_is_without_replacement() -> None:
    N = 20000
    q = mx.broadcast_to(mx.array(Q_DRAFT.astype(np.float32)), (N, 6))
    toks = np.array(draft_on_device(q, 2, mx.random.key(3)))
    pairs = Counter(map(tuple, toks.tolist()))
    stat, df, pval = goodness_of_fit(pairs, pair_law(Q_DRAFT))
    assert pval > ALPHA, (stat, df)


def test_draft_pads_when_fewer_tokens_have_mass() -> None:
    q = np.array([[0.0, 0.7, 0.0, 0.3], [0.0, 0.0, 1.0, 0.0]])
    toks, valid = draft(q, [3, 2], np.random.default_rng(0))
    assert toks.shape == (2, 3)
    assert valid.tolist() == [[True, True, False], [True, False, False]]
    assert set(toks[0, :2].tolist()) == {1, 3} and toks[1, 0] == 2


# ------------------------------------------------ acceptance: exactness without a model

V = 6
_g = np.random.default_rng(123)
_T = np.exp(_g.normal(size=(V, V, V)) * 1.5)
_T[..., 5] = 0.0  # token 5 has target probability 0 (as if filtered), drafts propose it
TARGET = _T / _T.sum(-1, keepdims=True)


def _proposal(seed: int, zero: tuple[int, ...] = ()) -> np.ndarray:
    q = np.exp(np.random.default_rng(seed).normal(size=(V, V)))
    q[:, list(zero)] = 0.0
    return q / q.sum(-1, keepdims=True)


# proposal of depth d given the root token; depth 2 has a single token of mass (padding)
PROPOSALS = [_proposal(1), _proposal(2, zero=(0, 1, 2, 3, 4)), _proposal(3)]


def p_next(seq: list[int]) -> np.ndarray:
    return TARGET[seq[-2], seq[-1]]


def simulate(tree, topk: list[int], n_out: int, rng, pass_cands: bool) -> tuple[int, ...]:
    """The decode loop on a synthetic language model: draft, verify, accept, repeat."""
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
        path, nxt = accept_sampled(tree, tokens, p, q, rng, cands if pass_cands else None)
        emitted = [int(tokens[i]) for i in path[1:]] + [nxt]
        seq += emitted
        out += emitted
    return tuple(out[:n_out])


def exact_law(n: int) -> dict:
    law = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for prefix, pr in law.items():
            dist = p_next([2, 4] + list(prefix))
            for t in np.flatnonzero(dist):
                nxt[prefix + (int(t),)] = pr * dist[t]
        law = nxt
    return law


@pytest.mark.parametrize(
    "tree,topk,pass_cands",
    [
        (product_tree([3, 2, 1]), [3, 2, 1], False),
        # ranks skipped (1 at depth 1, 0 at depth 2): needs the candidates themselves
        (make_tree([-1, 0, 0, 1, 2], [0, 1, 1, 2, 2], [0, 0, 2, 0, 1]), [3, 2], True),
    ],
)
def test_accept_sampled_emits_the_target_distribution(tree, topk, pass_cands) -> None:
    """The first emitted token follows p[root] and the first three tokens follow the
    target's joint law (goodness of fit, 12000 runs of the synthetic decode loop)."""
    rng = np.random.default_rng(2024)
    runs = [simulate(tree, topk, 3, rng, pass_cands) for _ in range(12000)]
    first = Counter(r[0] for r in runs)
    stat1, df1, p1 = goodness_of_fit(first, {k[0]: v for k, v in exact_law(1).items()})
    stat3, df3, p3 = goodness_of_fit(Counter(runs), exact_law(3))
    assert p1 > ALPHA, (stat1, df1)
    assert p3 > ALPHA, (stat3, df3)


def lookup_chain(seq: list[int], length: int) -> list[int]:
    """A deterministic branch, as a context lookup makes one: the target's likeliest
    token after the sequence, then after that, ...; every third chain starts with
    token 5 instead (target probability 0), so rejected branches occur too."""
    seq, chain = list(seq), []
    for i in range(length):
        t = 5 if i == 0 and seq[-1] % 3 == 0 else int(np.argmax(p_next(seq)))
        chain.append(t)
        seq.append(t)
    return chain


def simulate_branched(base, topk: list[int], n_out: int, rng,
                      accept=accept_sampled) -> tuple[int, ...]:
    """``simulate`` with a deterministic branch of 3 tokens joined to the tree as
    ``drafting.ContextDrafter`` joins it: along the stream nodes that carry its tokens
    (shared nodes), then as new nodes."""
    seq, out = [2, 4], []
    while len(out) < n_out:
        q = np.array([PROPOSALS[d][seq[-1]] for d in range(base.max_depth)]).reshape(-1, V)
        cands, _ = draft(q, topk, rng)
        tokens = [seq[-1]] + [int(cands[base.depth[i] - 1, base.rank[i]])
                              for i in range(1, base.size)]
        chain = lookup_chain(seq, 3)
        on = follow_chain(base, np.array(tokens), chain)
        tree = with_chain(base, on[-1], len(chain) - len(on) + 1)
        tokens = np.array(tokens + chain[len(on) - 1:])
        branch = on + list(range(base.size, tree.size))
        ancestry = []
        for i in range(tree.size):
            par = int(tree.parent[i])
            ancestry.append((ancestry[par] if par >= 0 else []) + [i])
        p = np.stack([p_next(seq + [int(tokens[j]) for j in a[1:]]) for a in ancestry])
        path, nxt = accept(tree, tokens, p, q, rng, cands, base.size, branch)
        emitted = [int(tokens[i]) for i in path[1:]] + [nxt]
        seq += emitted
        out += emitted
    return tuple(out[:n_out])


@pytest.mark.parametrize("base,topk", [(product_tree([3, 2]), [3, 2]),
                                       (product_tree([]), [])])
def test_a_deterministic_branch_keeps_the_target_distribution(base, topk) -> None:
    """A branch of context-lookup tokens beside (and through) the streams' draws: the
    first three emitted tokens still follow the target's joint law (12000 runs)."""
    rng = np.random.default_rng(11)
    runs = [simulate_branched(base, topk, 3, rng) for _ in range(12000)]
    stat, df, pval = goodness_of_fit(Counter(runs), exact_law(3))
    assert pval > ALPHA, (stat, df)


def test_a_deterministic_branch_is_taken_with_the_target_probability() -> None:
    """Root + a branch of one token y: accepted with probability p(y); when rejected,
    the next token is drawn from p without y."""
    tree = with_chain(product_tree([]), 0, 1)
    p = np.zeros((2, V))
    p[0, [1, 2, 3]] = [0.3, 0.5, 0.2]
    p[1, 4] = 1.0
    seen = Counter()
    rng = np.random.default_rng(3)
    for _ in range(4000):
        path, nxt = accept_sampled(tree, np.array([0, 2]), p, np.zeros((0, V)), rng,
                                   streams=1, branch=[0, 1])
        seen[(len(path), nxt)] += 1
    assert set(seen) == {(2, 4), (1, 1), (1, 3)}  # never y = 2 from the residual
    assert abs(seen[(2, 4)] / 4000 - 0.5) < 0.04
    assert abs(seen[(1, 1)] / (seen[(1, 1)] + seen[(1, 3)]) - 0.6) < 0.05


def test_accept_sampled_takes_the_whole_chain_when_streams_are_exact() -> None:
    tree = product_tree([2, 2])
    tokens = np.array([0, 1, 2, 3, 4, 3, 4])
    p = np.zeros((7, V))
    p[0, 1] = p[1, 3] = 1.0  # the target is deterministic: 1 then 3 then 5
    p[3, 5] = 1.0
    p[[2, 4, 5, 6], 0] = 1.0
    q = np.zeros((2, V))
    q[0, [1, 2]] = [0.9, 0.1]
    q[1, [3, 4]] = [0.6, 0.4]
    for s in range(20):
        path, nxt = accept_sampled(tree, tokens, p, q, np.random.default_rng(s))
        assert path == [0, 1, 3] and nxt == 5


def test_accept_sampled_never_accepts_padding_or_zero_target() -> None:
    tree = product_tree([3])
    q = np.zeros((1, V))
    q[0, [1, 5]] = [0.5, 0.5]  # two tokens of mass for three candidates: rank 2 is padding
    tokens = np.array([0, 5, 1, 0])  # padding carries token 0, which the target loves
    p = np.zeros((4, V))
    p[0, [0, 1]] = [0.9, 0.1]
    p[1:, 2] = 1.0
    seen = Counter()
    for s in range(300):
        path, nxt = accept_sampled(tree, tokens, p, q, np.random.default_rng(s))
        assert path == [0]  # token 5: p = 0; token 1: no residual mass; node 3: padding
        seen[path[-1], nxt] += 1
    assert set(seen) == {(0, 0)}  # the residual keeps token 0 only


# ----------------------------------------------------------- the decode loop on a model

PROMPT = mx.array([1, 5, 7])
MODEL_PARAMS = SamplingParams(temp=1.0, top_p=0.9, repetition_penalty=1.3)
RUNS = 1200


@pytest.fixture(scope="module")
def small_model() -> SpecStreamModel:
    """Vocabulary 16, tree 1 + 4 + 8; untrained streams on weights of spread 0.2 accept
    about 70 % at depth 1 and 45 % at depth 2: acceptance, rejection of several siblings
    and residual draws all happen."""
    base = tiny_base("llama", seed=1, vocab=16, spread=0.2, layers=2)
    model = SpecStreamModel(
        base, SpecStreamConfig(num_streams=2, stream_layers=1, tree_topk=[4, 2])
    )
    mx.eval(model.parameters())
    return model


def _params(seed: int) -> SamplingParams:
    return SamplingParams(**{**MODEL_PARAMS.__dict__, "seed": seed})


@pytest.fixture(scope="module")
def samples(small_model) -> dict[str, Counter]:
    spec = Counter(
        tuple(sampled_speculative_steps(small_model, PROMPT, 3, DecodeStats(), _params(i)))
        for i in range(RUNS)
    )
    ar = Counter(
        tuple(
            sampled_autoregressive_steps(small_model, PROMPT, 3, DecodeStats(), _params(10**6 + i))
        )
        for i in range(RUNS)
    )
    return {"spec": spec, "ar": ar}


@pytest.fixture(scope="module")
def model_law(small_model) -> dict:
    """Exact law of the first three tokens under the target (full-sequence forwards)."""
    base, V = small_model.base, 16
    prefixes = [()]
    law = {(): 1.0}
    for _ in range(3):
        seqs = mx.array([PROMPT.tolist() + list(pre) for pre in prefixes])
        logits = base(seqs)[:, -1]
        hists = [PROMPT.tolist() + list(pre) for pre in prefixes]
        probs = np.array(target_probs(logits, hists, MODEL_PARAMS), dtype=np.float64)
        law = {
            pre + (t,): law[pre] * probs[i, t]
            for i, pre in enumerate(prefixes)
            for t in range(V)
            if probs[i, t] > 0
        }
        prefixes = list(law)
    return law


def _first(counts: Counter, n: int) -> Counter:
    out = Counter()
    for k, v in counts.items():
        out[k[:n]] += v
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_speculative_sampling_matches_autoregressive_sampling(samples, n) -> None:
    """The issue's test: joint law of the first n tokens, speculative vs autoregressive
    sampling (1200 seeded runs each), chi-square two-sample test, false-alarm rate
    ALPHA = 1e-3 per test (cells with < 10 observations merged)."""
    stat, df, pval = two_sample(_first(samples["spec"], n), _first(samples["ar"], n))
    assert df >= 10
    assert pval > ALPHA, (stat, df)


@pytest.mark.parametrize("which", ["spec", "ar"])
@pytest.mark.parametrize("n", [2, 3])
def test_sampling_matches_the_exact_model_law(samples, model_law, which, n) -> None:
    """Goodness of fit of the first n tokens against the model's exact law (ALPHA each)."""
    law = Counter()
    for k, v in model_law.items():
        law[k[:n]] += v
    stat, df, pval = goodness_of_fit(_first(samples[which], n), law)
    assert pval > ALPHA, (stat, df)


def test_seeded_runs_are_reproducible(small_model) -> None:
    def run(seed: int) -> tuple[list[int], list[int]]:
        stats = DecodeStats()
        out = list(sampled_speculative_steps(small_model, PROMPT, 30, stats, _params(seed)))
        return out, stats.accepted_per_depth

    assert run(5) == run(5)
    assert run(5)[0] != run(6)[0]
    ar = [
        list(sampled_autoregressive_steps(small_model, PROMPT, 30, DecodeStats(), _params(5)))
        for _ in range(2)
    ]
    assert ar[0] == ar[1]


def test_temp_zero_with_penalty_is_greedy_on_penalised_logits() -> None:
    model = tiny_model("llama", lora_rank=4, random_lora=True)
    prompt = mx.array([1, 5, 7, 9, 11, 2, 3])
    procs = make_logits_processors(repetition_penalty=1.5)
    ref = [
        int(t) for t, _ in generate_step(prompt, model.base, max_tokens=30, logits_processors=procs)
    ]
    params = SamplingParams(temp=0.0, repetition_penalty=1.5)
    assert list(sampled_speculative_steps(model, prompt, 30, DecodeStats(), params)) == ref
    assert list(sampled_autoregressive_steps(model, prompt, 30, DecodeStats(), params)) == ref


@pytest.mark.parametrize("kw", [{"top_k": 2}, {"top_p": 0.4}, {"min_p": 0.4}])
def test_filtered_tokens_are_never_emitted(kw) -> None:
    model = tiny_model("llama")
    prompt = mx.array([1, 5, 7, 9])
    params = SamplingParams(temp=2.0, **kw)
    for seed in range(2):
        stats = DecodeStats()
        out = list(
            sampled_speculative_steps(
                model, prompt, 30, stats, SamplingParams(**{**params.__dict__, "seed": seed})
            )
        )
        seq = mx.array(prompt.tolist() + out)[None]
        logits = model.base(seq)[0, prompt.shape[0] - 1 : -1]
        p = np.array(target_probs(logits, None, params))
        assert (p[np.arange(len(out)), out] > 0).all()
        assert stats.forward_passes > 0


def test_random_key_is_drawn_from_the_generator() -> None:
    a = random_key(np.random.default_rng(1))
    b = random_key(np.random.default_rng(1))
    assert np.array_equal(np.array(a), np.array(b))


# ---------------------------------------------------------------- stream_generate API


def test_stream_generate_temp_zero_is_the_greedy_decoder(api_model) -> None:
    model, tokenizer = api_model
    tokens = [r.token for r in stream_generate(model, tokenizer, "Hello", 16, temp=0.0)]
    default = [r.token for r in stream_generate(model, tokenizer, "Hello", 16)]
    greedy = list(speculative_steps(model, _encode(tokenizer, "Hello"), 16, DecodeStats()))
    assert tokens == default
    assert tokens[: len(greedy)] == greedy[: len(tokens)]


@pytest.mark.parametrize("speculative", [True, False])
def test_stream_generate_sampling_is_seeded(api_model, speculative) -> None:
    model, tokenizer = api_model

    def run(seed: int | None) -> list[int]:
        return [
            r.token
            for r in stream_generate(
                model,
                tokenizer,
                "Hello",
                16,
                temp=0.9,
                top_p=0.95,
                seed=seed,
                speculative=speculative,
            )
        ]

    assert run(3) == run(3)


@pytest.mark.parametrize(
    "kw",
    [
        {"temp": -1.0},
        {"top_p": 0.0},
        {"top_k": -2},
        {"min_p": 2.0},
        {"repetition_penalty": -1.0},
        {"seed": -5},
    ],
)
def test_stream_generate_rejects_bad_sampling_params(api_model, kw) -> None:
    model, tokenizer = api_model
    with pytest.raises(ValueError, match=next(iter(kw))):
        next(stream_generate(model, tokenizer, "Hello", 4, **kw))


def test_adaptive_pause_keeps_penalised_greedy_exact() -> None:
    """A cost ratio no tree can reach pauses drafting after every tree step."""
    model = tiny_model("llama", lora_rank=4, random_lora=True)
    model.cfg.draft_cost_ratio = 10.0
    prompt = mx.array([1, 5, 7, 9, 11, 2, 3])
    procs = make_logits_processors(repetition_penalty=1.5)
    ref = [
        int(t) for t, _ in generate_step(prompt, model.base, max_tokens=40, logits_processors=procs)
    ]
    params = SamplingParams(temp=0.0, repetition_penalty=1.5)
    stats = DecodeStats()
    assert list(sampled_speculative_steps(model, prompt, 40, stats, params)) == ref
    from mlx_specstream.decode import default_tree

    tree_passes = stats.tree_nodes // default_tree(model.cfg).size
    assert 0 < tree_passes < stats.forward_passes / 4  # most passes were paused


def test_adaptive_pause_keeps_the_sampling_law(small_model, model_law) -> None:
    """With pauses after every tree step, the first 3 tokens still follow the model's
    exact law (the second comes from a tree step, the third from a paused step)."""
    small_model.cfg.draft_cost_ratio = 10.0
    try:
        counts = Counter(
            tuple(sampled_speculative_steps(small_model, PROMPT, 3, DecodeStats(), _params(i)))
            for i in range(RUNS)
        )
    finally:
        small_model.cfg.draft_cost_ratio = 0.0
    law = Counter()
    for k, v in model_law.items():
        law[k[:3]] += v
    stat, df, pval = goodness_of_fit(counts, law)
    assert pval > ALPHA, (stat, df)


def assert_follows_the_law(counts: Counter, model_law: dict, lengths: tuple[int, ...]) -> None:
    """Goodness of fit of the first n tokens of ``counts`` against the exact law, for
    each n in ``lengths`` (ALPHA each)."""
    for n in lengths:
        law = Counter()
        for k, v in model_law.items():
            law[k[:n]] += v
        stat, df, pval = goodness_of_fit(_first(counts, n), law)
        assert pval > ALPHA, (n, stat, df)


def test_context_branches_keep_the_sampling_law(small_model, model_law) -> None:
    """Sampling with context branches from a corpus of the model's own samples (and the
    context): branches are accepted and rejected, and the first 3 tokens still follow
    the model's exact law."""
    from mlx_specstream.corpus import DraftCorpus

    texts = [list(sampled_autoregressive_steps(small_model, PROMPT, 8, DecodeStats(),
                                               _params(5 * 10**6 + i))) for i in range(60)]
    corpus = DraftCorpus(np.array([t for text in texts for t in [*text, -1]]))
    small_model.draft_corpus = corpus
    stats = DecodeStats()
    try:
        counts = Counter(
            tuple(sampled_speculative_steps(small_model, PROMPT, 3, stats, _params(i),
                                            lookup_branches=3))
            for i in range(RUNS)
        )
    finally:
        small_model.draft_corpus = None
    assert stats.lookup_passes > RUNS // 2
    assert 0 < stats.lookup_accepted < 3 * stats.lookup_passes
    assert_follows_the_law(counts, model_law, (2, 3))


def test_prompt_lookup_sampling_keeps_the_law(small_model, model_law) -> None:
    """drafter="lookup" when sampling: prompt-lookup drafts alone (one-token suffixes
    match often in a vocabulary of 16), the first 3 tokens follow the exact law."""
    from mlx_specstream.decode import lookup_steps
    from mlx_specstream.sampled import SampledAcceptor

    stats = DecodeStats()
    counts = Counter()
    for i in range(RUNS):
        params = _params(3 * 10**6 + i)
        acceptor = SampledAcceptor(params, params.make_rng())
        counts[tuple(lookup_steps(small_model, PROMPT, 3, stats, acceptor=acceptor))] += 1
    assert stats.lookup_passes > RUNS // 8 and stats.lookup_accepted > 0
    assert_follows_the_law(counts, model_law, (2, 3))
