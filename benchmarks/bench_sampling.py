"""Speculative Streaming with sampling: tokens per forward pass and speed at several
temperatures, against mlx-lm's own autoregressive sampling.

    python benchmarks/bench_sampling.py [--model PATH] [--per-category 2] [--max-tokens 128]
                                        [--temps 0,0.7,1.0] [--ref-temp 0.7] [--ours-ar]
                                        [--option KEY=VALUE ...] [--row NAME KEY=VALUE ...]
    python benchmarks/bench_sampling.py --suite chitchat --prompts 30  # held-out chitchat

The prompts are the broad suite of benchmarks/suite (2 of each category by default).
Every method decodes the same prompts on the same machine, interleaved (each prompt runs
every method before the next one) so that drift hits all alike.  Prompt i is seeded with
seed i in every method.  The reference is mlx-lm's ``stream_generate`` (detokenizing,
like ours) with ``make_sampler(temp=ref_temp)``.  ``--option`` passes an option to every
SS row; ``--row`` adds an SS row at the reference temperature with options of its own
(e.g. ``--row "SS, no context drafts" lookup_branches=0``).  Prints a table (tokens/s,
ratio to the reference, tokens per forward pass, acceptance per depth) and writes
JSON + Markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream.files import atomic_write_text

import mlx.core as mx
from common import (
    Method,
    Tally,
    add_option_args,
    add_suite_args,
    chat_ids,
    describe_suite,
    load_pair,
    options_from_args,
    run_mlx_lm,
    run_ours,
    suite_from_args,
)
from mlx_lm.sample_utils import make_sampler

RESULTS = Path(__file__).resolve().parent / "results"


def acceptance_percent(t: Tally) -> str:
    return " ".join(f"{100.0 * a:.0f}%" for a in t.acceptance) or "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    add_suite_args(p, per_category=2, chitchat_prompts=30)
    add_option_args(p, "SS row")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temps", default="0,0.7,1.0", help="comma-separated temperatures")
    p.add_argument("--ref-temp", type=float, default=0.7, help="mlx-lm reference temperature")
    p.add_argument("--ours-ar", action="store_true", help="also time our autoregressive sampling")
    p.add_argument("--tag", default="sampling")
    args = p.parse_args(argv)
    temps = [float(t) for t in args.temps.split(",") if t.strip()]

    options, extra_rows = options_from_args(p, args)
    suite = suite_from_args(p, args)
    model, tokenizer, folder, ref_model = load_pair(args.model)
    prompts = [chat_ids(tokenizer, text) for _, text in suite]

    ref_name = f"mlx-lm autoregressive temp {args.ref_temp}"
    methods: dict[str, Method] = {
        ref_name: run_mlx_lm(ref_model, tokenizer, sampler=make_sampler(args.ref_temp))
    }
    if args.ours_ar:
        methods[f"ours autoregressive temp {args.ref_temp}"] = run_ours(
            model, tokenizer, speculative=False, temp=args.ref_temp
        )
    for t in temps:
        methods[f"SS temp {t}"] = run_ours(model, tokenizer, **options | {"temp": t})
    for name, opts in extra_rows:
        methods[name] = run_ours(model, tokenizer, **{"temp": args.ref_temp} | options | opts)

    rows = {name: Tally() for name in methods}
    for go in methods.values():  # warm-up (allocations, first-call costs)
        go(prompts[0][:32], 8, 0)
    for i, ids in enumerate(prompts):
        for name, go in methods.items():
            rows[name].add(go(ids, args.max_tokens, i))
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr)

    base = rows[ref_name].tps
    lines = [
        f"| method | tokens/s | vs {ref_name} | tokens/pass | acceptance per depth |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ratio = r.tps / base if base else 0.0
        lines.append(
            f"| {name} | {r.tps:.2f} | {ratio:.2f}x | {r.tokens_per_pass:.2f} | "
            f"{acceptance_percent(r)} |"
        )
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"{describe_suite(suite)} x {args.max_tokens} tokens, sampling (seed = prompt "
        f"index), {Path(folder).name}, "
        + (f"options: {', '.join(f'{k}={v}' for k, v in options.items())}, " if options else "")
        + f"{machine}, {mx.default_device()}, {stamp}"
    )
    print(header)
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "header": header,
        "rows": [
            {"method": name} | asdict(r) | {"tps": r.tps, "tokens_per_pass": r.tokens_per_pass}
            for name, r in rows.items()
        ],
    }
    atomic_write_text(RESULTS / f"{args.tag}.json", json.dumps(payload, indent=2))
    atomic_write_text(RESULTS / f"{args.tag}.md", header + "\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {RESULTS / args.tag}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
