"""Time one forward pass: mlx-lm's and ours, by number of new tokens, with and without
streams, after a prompt of fixed length.

    python benchmarks/bench_forward.py [--model PATH] [--context 256]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream.model import causal_mask

import mlx.core as mx
from common import load_pair
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache


def timeit(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def read_bandwidth(gb: float = 1.0, threads: int = 2) -> float:
    """Bytes per second that reading a large fp32 array reaches: numpy sums of disjoint
    slices on ``threads`` threads (numpy releases the GIL), best of 5."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    a = np.ones(int(gb * 2**30) // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--sizes", default="1,4,8,16,32,64")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    model, _, _, ref = load_pair(args.model)
    ctx = mx.random.randint(0, model.args.vocab_size, (args.context,))

    ref_cache = make_prompt_cache(ref)
    mx.eval(ref(ctx[None], cache=ref_cache))
    cache = model.make_cache()
    model(ctx, cache=cache, with_streams=False)
    cache.commit()
    mx.eval(cache.state_arrays())

    print(f"{'tokens':>6} | {'mlx-lm ms':>9} | {'ours ms':>8} | {'ours+streams ms':>15} | "
          f"{'x 1-token':>9}")
    base1 = None
    for n in [int(s) for s in args.sizes.split(",")]:
        toks = mx.random.randint(0, model.args.vocab_size, (1, n))

        def ref_pass(toks=toks, n=n):
            mx.eval(ref(toks, cache=ref_cache))
            trim_prompt_cache(ref_cache, n)

        def ours(with_streams: bool, toks=toks, n=n):
            def f():
                off = cache.offset
                pos = mx.arange(off, off + n)
                mask = causal_mask(n) if n > 1 else None
                h = model.lower(toks, pos, mask=mask, cache=cache)
                main, sh = model.upper(h, pos, mask=mask, cache=cache, with_streams=with_streams)
                # the decoder reads out only the accepted node's streams: one row
                mx.eval(main, model.stream_logits(sh[:, -1]) if sh is not None else main)
                cache.discard()
            return f

        t_ref = timeit(ref_pass, args.repeat) * 1e3
        t_ours = timeit(ours(False), args.repeat) * 1e3
        t_str = timeit(ours(True), args.repeat) * 1e3
        base1 = base1 or t_ref
        print(f"{n:>6} | {t_ref:>9.1f} | {t_ours:>8.1f} | {t_str:>15.1f} | {t_ref / base1:>9.2f}")
    weights = sum(v.nbytes for _, v in tree_flatten(model.base.parameters()))
    bw = read_bandwidth()
    bound = weights / bw * 1e3
    print(f"weights {weights / 1e6:.0f} MB, measured read bandwidth {bw / 1e9:.1f} GB/s: "
          f"bandwidth bound of a 1-token pass {bound:.1f} ms; mlx-lm's is {base1 / bound:.2f}x it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
