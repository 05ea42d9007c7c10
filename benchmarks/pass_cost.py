"""Cost of one forward pass against its number of rows, for several folders of one model
(e.g. fp32 and 4-bit): mlx-lm's own 1-token step, our plain 1-token pass and passes of n
draft nodes with their stream rows, after ``--context`` tokens, best of ``--repeat``.

    python benchmarks/pass_cost.py --model FOLDER [--model FOLDER ...] \\
        [--streams-path STREAMS] [--sizes 1,2,4,8] [--tag NAME]

Prints a table; ``--tag NAME`` writes benchmarks/results/pass_cost_NAME.{json,md}."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream import load
from mlx_specstream.calibrate import measure_cost
from mlx_specstream.models import resolve_model

import mlx.core as mx
from mlx_lm import load as mlx_lm_load
from mlx_lm.models.cache import make_prompt_cache

RESULTS = Path(__file__).resolve().parent / "results"


def mlx_lm_step(folder: str, context: int, repeat: int) -> float:
    """Seconds of one 1-token step of mlx-lm's model after ``context`` tokens."""
    model, _ = mlx_lm_load(folder)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.arange(context)[None], cache=cache))
    best = float("inf")
    for _ in range(repeat + 1):
        tic = time.perf_counter()
        mx.eval(model(mx.array([[5]]), cache=cache))
        best = min(best, time.perf_counter() - tic)
        for c in cache:
            c.trim(1)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, help="model folder or name")
    p.add_argument("--streams-path", default=None, help="streams for every folder")
    p.add_argument("--sizes", default="1,2,4,8", help="draft nodes per pass, comma-separated")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    sizes = tuple(int(n) for n in args.sizes.split(","))
    rows = {}
    for name in args.model:
        folder = str(resolve_model(name))
        model, _ = load(folder, streams_path=args.streams_path)
        cost = measure_cost(model, sizes=sizes, context=args.context, repeat=args.repeat,
                            progress=False)
        del model
        cost["mlx_lm_step"] = mlx_lm_step(folder, args.context, args.repeat)
        rows[name] = cost
    head = (["folder", "mlx-lm 1-token step", "plain 1-token pass"]
            + [f"{n} node{'s' * (n > 1)} + streams" for n in sizes])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, c in rows.items():
        ms = [c["mlx_lm_step"], c["autoregressive"]] + [c["tree"][str(n)] for n in sizes]
        lines.append(f"| {Path(name).name} | " + " | ".join(f"{1000 * t:,.0f} ms" for t in ms)
                     + " |")
    table = (f"Pass cost, context {args.context} tokens, best of {args.repeat}; streams: "
             f"{args.streams_path or 'each folder'}\n\n" + "\n".join(lines))
    print(table)
    if args.tag:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"pass_cost_{args.tag}.json").write_text(json.dumps(rows, indent=2) + "\n")
        (RESULTS / f"pass_cost_{args.tag}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
