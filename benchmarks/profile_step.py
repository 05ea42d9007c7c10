"""Where the time of one decoding step goes: the stages of a speculative step (and of a
plain autoregressive step) timed with an ``mx.eval`` barrier after each, then the ops of
one decoder layer in a 1-token pass (``--ops``), scaled by the number of layers.

    python benchmarks/profile_step.py [--model PATH] [--tree-topk 2,1,1] [--context 256]

Barriers remove the overlap MLX would otherwise get, so the stages add up to a little
more than a real step; the split is what matters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream import load
from mlx_specstream.decode import default_tree
from mlx_specstream.drafting import topk_indices
from mlx_specstream.tree import accept_greedy, parse_tree_shape, product_tree

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--tree-topk", default=None, help="product tree, e.g. 2,1,1 (default: config)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ops", action="store_true", help="also split a 1-token pass by op")
    args = p.parse_args(argv)
    model, _ = load(args.model)
    tree = (product_tree(parse_tree_shape(args.tree_topk)) if args.tree_topk
            else default_tree(model.cfg))
    g = model.cfg.num_streams
    V = model.args.vocab_size
    rng = np.random.default_rng(0)
    cache = model.make_cache()
    model(mx.array(rng.integers(0, V, args.context).astype(np.int32)), cache=cache,
          with_streams=False)
    cache.commit()
    mx.eval(cache.state_arrays())
    depth = mx.array(tree.depth.astype(np.int32))
    mask = mx.array(tree.mask)
    times: dict[str, list[float]] = {}

    def lap(name: str, t0: float) -> float:
        t1 = time.perf_counter()
        times.setdefault(name, []).append((t1 - t0) * 1e3)
        return t1

    for _ in range(args.steps + 2):
        off = cache.offset
        tokens = mx.array(rng.integers(0, V, tree.size).astype(np.int32))
        mx.eval(tokens)
        t = time.perf_counter()
        h = model.lower(tokens, depth + off, mask=mask, cache=cache)
        mx.eval(h)
        t = lap(f"lower layers ({model.split}) x {tree.size} nodes", t)
        x = model.upper_hidden(h, depth + off, mask=mask, cache=cache)[0]
        mx.eval(x)
        t = lap(f"MSA layers ({model.cfg.stream_layers}) x {tree.size} nodes x (1+{g})", t)
        logits = model.head(x[: tree.size])
        mx.eval(logits)
        t = lap(f"LM head x {tree.size} main rows", t)
        pred = mx.argmax(logits, axis=-1)
        pred_np, tok_np = np.array(pred), np.array(tokens)
        t = lap("argmax + host sync", t)
        path = accept_greedy(tree, tok_np, pred_np)
        cache.commit(path)
        t = lap("acceptance + commit (host)", t)
        host = tree.size + path[-1] * g
        cands = topk_indices(model.head(x[host : host + g]), tree.kmax)
        mx.eval(cands, cache.state_arrays())
        lap(f"LM head x {g} stream rows of the accepted node + top-k + cache gather", t)

    # plain autoregressive step for reference
    for _ in range(args.steps + 2):
        off = cache.offset
        tok = mx.array([[int(rng.integers(0, V))]])
        t = time.perf_counter()
        pos = mx.array([off])
        x = model.upper_hidden(model.lower(tok, pos, cache=cache), pos, cache=cache,
                               with_streams=False)
        mx.eval(mx.argmax(model.head(x[0, -1])))
        cache.commit()
        lap("autoregressive step (1 token, no streams)", t)

    print(f"tree: {tree.size} nodes, depth {tree.max_depth}, context {args.context}")
    print(f"{'stage':<58} {'median ms':>9}")
    total = 0.0
    for name, v in times.items():
        med = statistics.median(v[2:])
        if not name.startswith("autoregressive"):
            total += med
        print(f"{name:<58} {med:>9.2f}")
    print(f"{'speculative step, sum of stages':<58} {total:>9.2f}")
    if args.ops:
        profile_ops(model, cache)
    return 0


def profile_ops(model, cache, repeat: int = 50) -> None:
    """A 1-token pass split by op: each op of one middle layer timed alone (inputs
    evaluated first, best of ``repeat``), times the number of layers; then the LM head.
    The sum exceeds the real pass by the per-op dispatch and barrier costs, which
    ``mx.eval`` of one small op mostly is."""
    from mlx_specstream.model import _rope

    layer = model.layers[len(model.layers) // 2]
    attn, mlp = layer.self_attn, layer.mlp
    n_layers = len(model.layers)
    D = model.args.hidden_size
    x = mx.random.normal((1, 1, D))
    pos = mx.array([[cache.offset]])
    kv_len = cache.offset + 1
    k_cache = mx.random.normal((1, attn.n_kv_heads, kv_len, D // attn.n_heads))
    q4 = mx.random.normal((1, attn.n_heads, 1, D // attn.n_heads))
    h = layer.input_layernorm(x)
    hm = mx.random.normal((1, 1, mlp.gate_proj.weight.shape[0]))
    mx.eval(x, k_cache, q4, h, hm)

    def best(fn) -> float:
        mx.eval(fn())
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            mx.eval(fn())
            ts.append(time.perf_counter() - t)
        return min(ts) * 1e3

    q = attn.q_proj(h).reshape(1, 1, attn.n_heads, -1)
    new_kv = k_cache[..., :1, :] + 1
    mx.eval(q, new_kv)

    def write(buf: mx.array) -> mx.array:
        buf[..., kv_len - 1 : kv_len, :] = new_kv
        return buf
    ops = {
        "rms norm x2": lambda: [layer.input_layernorm(x), layer.post_attention_layernorm(x)],
        "q, k, v projections": lambda: [attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)],
        "rope q, k": lambda: [_rope(attn.rope, q, pos), _rope(attn.rope, q, pos)],
        "cache write k, v (slice update)": lambda: [write(k_cache), write(k_cache)],
        f"attention over {kv_len} positions": lambda: mx.fast.scaled_dot_product_attention(
            q4, k_cache, k_cache, scale=attn.scale),
        "o projection": lambda: attn.o_proj(h),
        "gate, up projections": lambda: [mlp.gate_proj(h), mlp.up_proj(h)],
        "swiglu": lambda: nn.silu(hm) * hm,
        "down projection": lambda: mlp.down_proj(hm),
        "residual adds x2": lambda: [x + h, h + x],
    }
    print(f"\n1-token pass by op ({n_layers} layers, context {kv_len}); ms, best of {repeat}")
    total = 0.0
    for name, fn in ops.items():
        ms = best(fn) * n_layers
        total += ms
        print(f"{name:<58} {ms:>9.2f}")
    head = best(lambda: model.head(x))
    total += head
    print(f"{'final norm + LM head':<58} {head:>9.2f}")
    print(f"{'sum (each op alone, with its own barrier)':<58} {total:>9.2f}")
    one = mx.array([[5]])

    def real() -> mx.array:
        out = model.upper_hidden(model.lower(one, pos[0], cache=cache), pos[0], cache=cache,
                                 with_streams=False)
        cache.commit([])  # keep none of the pending rows
        return model.head(out[0, -1])

    print(f"{'real 1-token pass (one graph, one barrier)':<58} {best(real):>9.2f}")


if __name__ == "__main__":
    sys.exit(main())
