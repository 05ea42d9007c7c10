"""Where the time of one decoding step goes.

1. The stages of a speculative step (and of a plain autoregressive step) timed with an
   ``mx.eval`` barrier after each, and one whole tree pass with a single barrier (the
   pass time), after ``--context`` tokens of context.
2. The real decoding loops (greedy and sampled speculative, pause off, no context
   branch) on a suite prompt: wall time per pass and the host time per pass, i.e. the
   CPU time of the Python thread (graph building, host reads, acceptance); the device
   work runs on MLX's own threads and is not counted in it.
3. ``--ops``: the ops of one decoder layer in a 1-token pass, scaled by the layers.

    python benchmarks/profile_step.py [--model PATH] [--tree-topk 2,1,1] [--context 256]
        [--tokens 48] [--tag NAME]

Barriers remove the overlap MLX would otherwise get, so the stages add up to a little
more than a real step; the split is what matters.  ``--tag NAME`` writes
benchmarks/results/profile_step_NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream import load
from mlx_specstream.decode import DecodeStats, default_tree, speculative_steps
from mlx_specstream.drafting import topk_indices
from mlx_specstream.sampled import sampled_speculative_steps
from mlx_specstream.sampling import SamplingParams
from mlx_specstream.tree import accept_greedy, parse_tree_shape, product_tree

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from common import chat_ids, load_suite

RESULTS = Path(__file__).resolve().parent / "results"


def stage_times(model, tree, context: int, steps: int
                ) -> tuple[dict[str, dict[str, float]], object]:
    """Median and minimum ms of each stage of a speculative step, of a whole tree pass
    with one barrier and of a plain autoregressive step, after ``context`` random
    tokens; and the cache they ran on.  (The minimum is the cost with the least noise
    from other processes.)"""
    g = model.cfg.num_streams
    V = model.args.vocab_size
    rng = np.random.default_rng(0)
    cache = model.make_cache()
    model(mx.array(rng.integers(0, V, context).astype(np.int32)), cache=cache,
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

    for _ in range(steps + 2):
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

    # the same pass with one barrier: what a step costs the device
    for _ in range(steps + 2):
        off = cache.offset
        tokens = mx.array(rng.integers(0, V, tree.size).astype(np.int32))
        mx.eval(tokens)
        t = time.perf_counter()
        x = model.upper_hidden(model.lower(tokens, depth + off, mask, cache), depth + off,
                               mask, cache)[0]
        pred = mx.argmax(model.head(x[: tree.size]), axis=-1)
        mx.eval(pred, topk_indices(model.head(x[tree.size : tree.size + g]), tree.kmax))
        lap(f"tree pass ({tree.size} nodes + streams of one), one barrier", t)
        cache.discard()

    # plain autoregressive step for reference
    for _ in range(steps + 2):
        off = cache.offset
        tok = mx.array([[int(rng.integers(0, V))]])
        t = time.perf_counter()
        pos = mx.array([off])
        x = model.upper_hidden(model.lower(tok, pos, cache=cache), pos, cache=cache,
                               with_streams=False)
        mx.eval(mx.argmax(model.head(x[0, -1])))
        cache.commit()
        lap("autoregressive step (1 token, no streams)", t)
    return {name: {"median": statistics.median(v[2:]), "min": min(v[2:])}
            for name, v in times.items()}, cache


class _Concatenating:
    """A cache stand-in that is not a TreeKVCache: ``run_layer`` then concatenates the
    stream rows' keys/values to the whole visible cache, the copy the spare slots save."""

    def __init__(self, cache) -> None:
        self.cache = cache

    @property
    def offset(self) -> int:
        return self.cache.offset

    def write(self, layer: int, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return self.cache.write(layer, keys, values)


def compare_kv(model, cache, tree, rounds: int) -> dict[str, dict[str, float]]:
    """The MSA layers of one tree pass over ``cache``, stream keys/values in the spare
    slots vs concatenated to the cache, alternated ``rounds`` times (so both see the same
    load): min and median ms, and the peak memory above the resident arrays (MB)."""
    V = model.args.vocab_size
    rng = np.random.default_rng(1)
    off = cache.offset
    pos = mx.array(tree.depth.astype(np.int32)) + off
    mask = mx.array(tree.mask)
    tokens = mx.array(rng.integers(0, V, tree.size).astype(np.int32))
    h = model.lower(tokens, pos, mask, cache)
    mx.eval(h)
    times: dict[str, list[float]] = {"spare slots": [], "concatenation": []}
    peak: dict[str, float] = {}
    for _ in range(rounds + 1):
        for name, writer in (("spare slots", cache), ("concatenation", _Concatenating(cache))):
            mx.reset_peak_memory()
            before = mx.get_active_memory()
            t = time.perf_counter()
            mx.eval(model.upper_hidden(h, pos, mask, writer))
            times[name].append((time.perf_counter() - t) * 1e3)
            peak[name] = max(peak.get(name, 0.0), (mx.get_peak_memory() - before) / 2**20)
    cache.discard()
    return {name: {"min": min(v[1:]), "median": statistics.median(v[1:]), "peak_mb": peak[name]}
            for name, v in times.items()}


def loop_times(model, tokenizer, tree, tokens: int, repeat: int) -> dict[str, dict]:
    """Wall and host (Python thread CPU) ms per pass of the real speculative loops,
    greedy and sampled (temp 1, seed 0), on the first writing prompt of the suite;
    the adaptive pause off and no context branch, so every pass verifies ``tree``.
    The best of ``repeat`` runs."""
    model.cfg = dataclasses.replace(model.cfg, draft_cost_ratio=0.0, lookup_branches=0)
    ids = mx.array(chat_ids(tokenizer, load_suite(["writing"], 1)[0][1]))
    runs = {
        "greedy": lambda s, n: speculative_steps(model, ids, n, s, tree, 0.0, False, 0),
        "sampled (temp 1)": lambda s, n: sampled_speculative_steps(
            model, ids, n, s, SamplingParams(temp=1.0, seed=0), tree),
    }
    out: dict[str, dict] = {}
    for name, run in runs.items():
        for _ in run(DecodeStats(), 8):  # warm-up: traces, allocations
            pass
        best = None
        for _ in range(repeat):
            stats = DecodeStats()
            steps = run(stats, tokens)
            next(steps)  # the prefill and the first token are not a step
            t, c = time.perf_counter(), time.thread_time()
            for _ in steps:
                pass
            wall, host = time.perf_counter() - t, time.thread_time() - c
            passes = max(stats.forward_passes, 1)
            r = {"wall_ms_per_pass": wall / passes * 1e3, "host_ms_per_pass": host / passes * 1e3,
                 "tokens_per_pass": stats.tokens_per_pass, "passes": stats.forward_passes}
            if best is None or r["wall_ms_per_pass"] < best["wall_ms_per_pass"]:
                best = r
        out[name] = best
    return out


def write_results(tag: str, result: dict, text: str) -> None:
    """benchmarks/results/profile_step_TAG.{json,md}, each written to a temp file first."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for ext, body in (("json", json.dumps(result, indent=2) + "\n"), ("md", text)):
        dest = RESULTS / f"profile_step_{tag}.{ext}"
        fd, tmp = tempfile.mkstemp(dir=RESULTS, prefix=f".{dest.name}.")
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.replace(tmp, dest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--tree-topk", default=None, help="product tree, e.g. 2,1,1 (default: config)")
    p.add_argument("--context", type=int, default=256, help="context before the timed passes")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--tokens", type=int, default=48,
                   help="tokens per run of the real loops (0: skip them)")
    p.add_argument("--repeat", type=int, default=2, help="runs of each real loop (best kept)")
    p.add_argument("--ops", action="store_true", help="also split a 1-token pass by op")
    p.add_argument("--compare-kv", type=int, default=0, metavar="ROUNDS",
                   help="also time the MSA layers with the stream keys in the cache's spare "
                   "slots vs concatenated to it, ROUNDS alternations")
    p.add_argument("--tag", default=None, help="write results/profile_step_TAG.{json,md}")
    args = p.parse_args(argv)
    model, tokenizer = load(args.model)
    tree = (product_tree(parse_tree_shape(args.tree_topk)) if args.tree_topk
            else default_tree(model.cfg))
    stages, cache = stage_times(model, tree, args.context, args.steps)
    lines = [f"tree: {tree.size} nodes, depth {tree.max_depth}, context {args.context}, "
             f"MLX_SPECSTREAM_COMPILE={os.environ.get('MLX_SPECSTREAM_COMPILE', 'unset')}, "
             f"{platform.machine()}, {mx.default_device()}, "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             "", "| stage | median ms | min ms |", "|---|---|---|"]
    total = {"median": 0.0, "min": 0.0}
    for name, t in stages.items():
        if not name.startswith(("autoregressive", "tree pass")):
            total = {k: total[k] + t[k] for k in total}
        lines.append(f"| {name} | {t['median']:.2f} | {t['min']:.2f} |")
    lines.append(f"| speculative step, sum of stages | {total['median']:.2f} | "
                 f"{total['min']:.2f} |")
    loops = loop_times(model, tokenizer, tree, args.tokens, args.repeat) if args.tokens else {}
    if loops:
        lines += ["", f"real loop, {args.tokens} tokens, pause off, no context branch "
                  f"(best of {args.repeat})", "",
                  "| loop | wall ms/pass | host ms/pass | tokens/pass |", "|---|---|---|---|"]
        for name, r in loops.items():
            lines.append(f"| {name} | {r['wall_ms_per_pass']:.2f} | "
                         f"{r['host_ms_per_pass']:.2f} | {r['tokens_per_pass']:.2f} |")
    kv = compare_kv(model, cache, tree, args.compare_kv) if args.compare_kv else {}
    if kv:
        lines += ["", f"MSA layers of a {tree.size}-node pass, context {cache.offset}, "
                  f"{args.compare_kv} alternations", "",
                  "| stream keys/values | min ms | median ms | peak MB above resident |",
                  "|---|---|---|---|"]
        for name, r in kv.items():
            lines.append(f"| {name} | {r['min']:.2f} | {r['median']:.2f} | {r['peak_mb']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.tag:
        write_results(args.tag, {"context": args.context, "tree_nodes": tree.size,
                                 "stages_ms": stages, "loops": loops, "kv": kv,
                                 "command": " ".join(sys.argv)}, text)
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
        cache.discard()
        return model.head(out[0, -1])

    print(f"{'real 1-token pass (one graph, one barrier)':<58} {best(real):>9.2f}")


if __name__ == "__main__":
    sys.exit(main())
