"""Draft vocabulary sizes (FR-Spec) in one run: for the whole head and K-token subsets, the
cost of the streams' LM head alone, the time per speculative pass, tokens per pass and the
greedy output (which must not change).

The ranking comes from the folder's draft_vocab.safetensors (``mlx-specstream vocab``) or,
with --data, from counting those texts here (nothing is written).  The adaptive pause is off
so that every pass drafts.

    python benchmarks/bench_draft_vocab.py --model PATH --sizes 0,8192,16384,32768 \\
        --per-category 1 --categories writing,coding,explaining,advice,casual --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import warnings

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream import load, vocab
from mlx_specstream.drafting import topk_indices
from mlx_specstream.models import resolve_model
from mlx_specstream.tree import parse_tree_shape

import mlx.core as mx
import numpy as np
from bench_forward import timeit
from common import (
    Tally,
    add_suite_args,
    chat_ids,
    describe_suite,
    markdown_table,
    run_ours,
    suite_from_args,
)


def ranking_for(folder, model_vocab: int, data: list[str] | None, tokenizer) -> np.ndarray:
    if data:
        texts = [t for path in data for t in vocab.output_texts(path)]
        eos = sorted(tokenizer.eos_token_ids)
        return vocab.rank_tokens(vocab.count_tokens(tokenizer, texts, model_vocab, eos))
    ids = vocab.load_draft_vocab(folder, model_vocab)
    return np.array(ids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder or built-in model name")
    p.add_argument("--sizes", default="0,8192,16384,32768", help="K values; 0: the whole head")
    p.add_argument("--data", action="append", default=None,
                   help="texts to rank the tokens by (distill's train.jsonl, text files)")
    p.add_argument("--tree-topk", default=None, type=parse_tree_shape,
                   help="product tree to draft (default: the folder's tree)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=20, help="timings of the head alone")
    add_suite_args(p, per_category=1, chitchat_prompts=5)
    args = p.parse_args(argv)
    prompts = suite_from_args(p, args)
    sizes = [int(s) for s in args.sizes.split(",")]

    folder = resolve_model(args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tokenizer = load(folder)
    model.cfg.draft_cost_ratio = 0.0  # every pass drafts: the pass cost is the tree's
    config = json.loads((folder / "config.json").read_text())
    n_vocab = int(config["vocab_size"])
    ranking = ranking_for(folder, n_vocab, args.data, tokenizer)
    opts = {"tree_topk": args.tree_topk} if args.tree_topk else {}
    rows_read = len(args.tree_topk) if args.tree_topk else model.cfg.num_streams
    hidden = mx.random.normal((rows_read, int(config["hidden_size"])))
    encoded = [chat_ids(tokenizer, text) for _, text in prompts]
    print(f"{folder.name}: vocabulary {n_vocab:,}; {describe_suite(prompts)}, "
          f"{args.max_tokens} tokens; tree {args.tree_topk or 'of the folder'}")

    table, reference = [], None
    for k in sizes:
        model.set_draft_vocab(mx.array(ranking[:k]) if k else None)

        def head_only() -> None:
            mx.eval(topk_indices(model.draft_logits(hidden), 3))

        head_ms = 1000 * timeit(head_only, args.repeat)
        go = run_ours(model, tokenizer, **opts)
        tally, outputs = Tally(), []
        for ids in encoded:
            run = go(ids, args.max_tokens)
            tally.add(run)
            outputs.append(run.tokens)
        reference = reference or outputs
        same = "yes" if outputs == reference else "NO"
        per_pass = 1000 * tally.seconds / max(tally.passes, 1)
        table.append([f"{k:,}" if k else f"whole ({n_vocab:,})", f"{head_ms:.2f}",
                      f"{per_pass:.1f}", f"{tally.tokens_per_pass:.3f}", f"{tally.tps:.2f}",
                      same])
        print(" | ".join(table[-1]), flush=True)
    print(markdown_table(["draft vocabulary", f"stream head, {rows_read} rows (ms)",
                          "ms / pass", "tokens / pass", "tokens / s", "same output"], table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
