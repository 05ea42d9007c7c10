"""What a batched pass costs against the rows each sequence brings: B sequences of L draft
nodes each, with and without their stream rows, over one sequence's plain 1-token pass.

This is the curve that decides whether speculation can keep its gain inside a batch: where
a pass is bound by reading the weights (a Mac's GPU), extra rows are nearly free at every
batch size; where it is bound by arithmetic (a 2-core CPU), each row costs a share of a
pass once the batch already fills the cores.

    python benchmarks/batch_pass_cost.py [--model PATH] [--batches 1,2,4,8] [--rows 1,2,3,4]
        [--context 128] [--repeat 6] [--sweeps 2] [--tag NAME]

Each cell is the best of ``--repeat`` passes, the grid swept ``--sweeps`` times (best kept),
so that a slow spell of the machine does not land on a few cells only.  Prints a table;
``--tag NAME`` writes benchmarks/results/batch_pass_cost_NAME.{json,md,png}."""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream import load
from mlx_specstream.batching import BatchKVCache
from mlx_specstream.calibrate import _filled_cache
from mlx_specstream.files import atomic_write_text
from mlx_specstream.models import resolve_model

import mlx.core as mx
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def pass_seconds(model, cache: BatchKVCache, B: int, L: int, streams: bool,
                 rng: np.random.Generator) -> float:
    """One batched pass of B sequences with a chain of L nodes each (nothing committed)."""
    toks = mx.array(rng.integers(0, model.args.vocab_size, (B, L)).astype(np.int32))
    pos = mx.array((cache.lengths[:, None] + np.arange(L)).astype(np.int32))
    mask = mx.array(np.broadcast_to(np.tril(np.ones((L, L), dtype=bool)), (B, L, L)).copy())
    t = time.perf_counter()
    h = model.lower(toks, pos, mask, cache)
    x = model.upper_hidden(h, pos, mask, cache, with_streams=streams)
    pred = mx.argmax(model.head(x[:, :L]), axis=-1)
    mx.eval(pred)
    np.array(pred)
    dt = time.perf_counter() - t
    cache.commit([[] for _ in range(B)])
    return dt


def measure(model, batches: list[int], rows: list[int], context: int, repeat: int,
            sweeps: int) -> dict[str, float]:
    """Seconds per cell "B,L,streams" (streams 0/1), best over sweeps and repeats."""
    rng = np.random.default_rng(0)
    single = _filled_cache(model, context, rng)
    caches = {}
    for B in batches:
        caches[B] = BatchKVCache(model.num_layers)
        for _ in range(B):
            caches[B].add(single)
        mx.eval(caches[B].state_arrays())
    best: dict[str, float] = {}
    for _ in range(sweeps):
        for B in batches:
            for L in rows:
                for streams in (False, True):
                    key = f"{B},{L},{int(streams)}"
                    pass_seconds(model, caches[B], B, L, streams, rng)  # warm-up
                    t = min(pass_seconds(model, caches[B], B, L, streams, rng)
                            for _ in range(repeat))
                    best[key] = min(best.get(key, float("inf")), t)
    return best


def table(best: dict[str, float], batches: list[int], rows: list[int]) -> str:
    base = best[f"{batches[0]},{rows[0]},0"]
    head = ["sequences", "rows each"] + ["plain", "with streams", "plain per row",
                                          "with streams per row"]
    out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for B in batches:
        for L in rows:
            p, s = best[f"{B},{L},0"] / base, best[f"{B},{L},1"] / base
            out.append(f"| {B} | {L} | {p:.2f} | {s:.2f} | {p / (B * L):.3f} | "
                       f"{s / (B * L):.3f} |")
    return "\n".join(out)


def plot(best: dict[str, float], batches: list[int], rows: list[int], path: Path,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = best[f"{batches[0]},{rows[0]},0"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for B in batches:
        line = ax.plot(rows, [best[f"{B},{L},0"] / base for L in rows], marker="o",
                       label=f"B={B} plain")[0]
        ax.plot(rows, [best[f"{B},{L},1"] / base for L in rows], marker="s", ls="--",
                color=line.get_color(), label=f"B={B} with streams")
    ax.set_xlabel("draft nodes per sequence (L)")
    ax.set_ylabel("pass cost / one sequence's plain 1-token pass")
    ax.set_xticks(rows)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder or name (default model)")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--rows", default="1,2,3,4")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--repeat", type=int, default=6)
    p.add_argument("--sweeps", type=int, default=2)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    rows = [int(n) for n in args.rows.split(",")]
    if min(batches + rows) < 1 or args.repeat < 1 or args.sweeps < 1:
        p.error("batches, rows, repeat and sweeps must be positive")
    folder = resolve_model(args.model)
    model, _ = load(str(folder))
    best = measure(model, batches, rows, args.context, args.repeat, args.sweeps)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = (f"{Path(folder).name}, context {args.context}, {platform.machine()}, "
             f"{mx.default_device()}, {stamp}")
    text = (f"Batched pass cost over one sequence's plain 1-token pass "
            f"({1000 * best[f'{batches[0]},{rows[0]},0']:.1f} ms); {title}; best of "
            f"{args.repeat} x {args.sweeps} sweeps\n\n" + table(best, batches, rows))
    print(text)
    if args.tag:
        RESULTS.mkdir(exist_ok=True)
        stem = RESULTS / f"batch_pass_cost_{args.tag}"
        atomic_write_text(stem.with_suffix(".json"), json.dumps(best, indent=2) + "\n")
        atomic_write_text(stem.with_suffix(".md"), text + "\n")
        plot(best, batches, rows, stem.with_suffix(".png"), title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
