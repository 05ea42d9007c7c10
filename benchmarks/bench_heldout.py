"""Tokens per forward pass of greedy Speculative Streaming, per prompt category: the
figure the trained streams are judged by (the target: >= 2.5 on the held-out chitchat
prompts, ``--suite chitchat``, with gamma 3 and the product tree [3, 2, 1]).  Counts the
passes after the prefill, each of which yields at least one token; the adaptive pause is
off unless ``--pause`` (it trades passes for speed, not acceptance).

    python benchmarks/bench_heldout.py [--model PATH] [--streams-path DIR]
        [--trees 3,2,1 config] [--max-tokens 128] [--output FILE.md]
        [--categories writing,coding] [--per-category N] [--suite chitchat --prompts 30]
        [--option KEY=VALUE ...] [--row NAME KEY=VALUE ...] [--pause]

"config" is the folder's own tree (the calibrated chain for the default model).  The
prompts are the broad suite of benchmarks/suite (every category, all its prompts) unless
``--suite chitchat``.  ``--option`` passes KEY=VALUE to stream_generate for every row;
``--row`` adds a row with options of its own on top, for instance
``--row "3,2,1 + context drafts" tree_topk=3,2,1 lookup_branches=2``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream import load
from mlx_specstream.files import atomic_write_text
from mlx_specstream.tree import parse_tree_shape

from common import (
    Tally,
    add_option_args,
    add_suite_args,
    chat_ids,
    describe_suite,
    fmt_acceptance,
    format_options,
    markdown_table,
    options_from_args,
    run_ours,
    suite_from_args,
    tally_by_category,
)


def measure(model, tokenizer, prompts: list[tuple[str, str]], max_tokens: int,
            **opts) -> dict[str, Tally]:
    """Greedy decoding of every (category, prompt); tallies per category and overall."""
    go = run_ours(model, tokenizer, **opts)
    return tally_by_category((cat, go(chat_ids(tokenizer, text), max_tokens))
                             for cat, text in prompts)


def tree_arg(text: str) -> str:
    """A --trees entry: "config", or a tree shape ("3,2,1") written as "k1,k2,...", else a
    usage error."""
    if text == "config":
        return text
    try:
        return ",".join(map(str, parse_tree_shape(text)))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}; or \"config\"") from None


def summary(t: Tally, depth: int) -> dict:
    """A tally as JSON: tokens are those the passes produced (EOS included)."""
    acc = t.acceptance + [0.0] * (depth - len(t.acceptance))
    return {"prompts": t.prompts, "tokens": t.step_tokens, "passes": t.passes,
            "tokens_per_pass": t.tokens_per_pass, "acceptance_per_depth": acc}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--streams-path", default=None, help="streams to use instead of the folder's")
    p.add_argument("--trees", nargs="+", type=tree_arg, default=["3,2,1", "config"],
                   help='product trees as "k1,k2,..." or "config"')
    add_suite_args(p, per_category=None, chitchat_prompts=30)
    p.add_argument("--max-tokens", type=int, default=128)
    add_option_args(p, "row")
    p.add_argument("--pause", action="store_true",
                   help="keep the folder's adaptive pause (default: every pass drafts)")
    p.add_argument("--output", default=None, help="also write the tables (markdown) and a .json")
    args = p.parse_args(argv)
    options, extra_rows = options_from_args(p, args)
    prompts = suite_from_args(p, args)

    model, tokenizer = load(args.model, streams_path=args.streams_path)
    if not args.pause:
        # The pause decodes plain passes when drafting does not pay on this machine; here
        # every pass drafts, so the count measures the streams alone.
        model.cfg = dataclasses.replace(model.cfg, draft_cost_ratio=0.0)
    variants: list[tuple[str, str, dict]] = []  # (name, short label, options)
    for tree in args.trees:
        if tree == "config":
            name = f"config {model.cfg.tree_paths or model.cfg.tree_topk}"
            variants.append((name, tree, {}))
        else:
            variants.append((tree, tree, {"tree_topk": parse_tree_shape(tree)}))
    variants += [(name, name, opts) for name, opts in extra_rows]

    g = model.cfg.num_streams
    rows, tallies = [], []
    for name, _, opts in variants:
        t = time.perf_counter()
        by_cat = measure(model, tokenizer, prompts, args.max_tokens, **(options | opts))
        rows.append({"tree": name, "options": options | opts, **summary(by_cat["overall"], g),
                     "seconds": time.perf_counter() - t,
                     "per_category": {c: summary(x, g) for c, x in by_cat.items()}})
        tallies.append(by_cat)
        print(f"{name}: {by_cat['overall'].tokens_per_pass:.3f} tokens/pass", file=sys.stderr)

    temp = float(options.get("temp", 0.0) or 0.0)
    decoding = f"sampled at temperature {temp:g}" if temp > 0 else "greedy"
    head = (f"{describe_suite(prompts)} x {args.max_tokens} tokens, {decoding}, gamma {g}, "
            f"adaptive pause {'on' if args.pause else 'off'}; "
            f"streams: {args.streams_path or 'the folder'}; "
            + (f"options: {format_options(options)}; " if options else "")
            + f"{platform.machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    overall = markdown_table(
        ["tree", "tokens/pass", "tokens", "passes"]
        + [f"accepted depth {d + 1}" for d in range(g)],
        [[r["tree"], f"{r['tokens_per_pass']:.3f}", str(r["tokens"]), str(r["passes"])]
         + [f"{a:.3f}" for a in r["acceptance_per_depth"]] for r in rows])
    per_cat = markdown_table(
        ["category", "prompts", "tokens"]
        + [h for _, label, _ in variants for h in (f"tokens/pass {label}", f"accepted {label}")],
        [[c, str(x.prompts), str(x.step_tokens)]
         + [v for by_cat in tallies for v in (f"{by_cat[c].tokens_per_pass:.3f}",
                                              fmt_acceptance(by_cat[c].acceptance))]
         for c, x in tallies[0].items()])
    text = (f"{head}\n\n{overall}\n\nPer category (tokens: those of the first row; "
            f"accepted: share of passes accepting depth 1 / 2 / ...):\n\n{per_cat}")
    print(text)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")
        atomic_write_text(out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
