"""Speculative Streaming against mlx-lm's autoregressive generate, in one run.

    python benchmarks/bench_decode.py [--model PATH] [--per-category 3] [--max-tokens 128]
    python benchmarks/bench_decode.py --peers --tag peers     # + every peer method
    python benchmarks/bench_decode.py --suite chitchat --prompts 10   # held-out chitchat only
    python benchmarks/bench_decode.py --categories coding,summarising --per-category 5 \
        --row "SS [3,2,1] + context drafts" tree_topk=3,2,1 lookup_branches=2

The prompts are the broad suite of benchmarks/suite (3 of each category by default;
``--categories``, ``--per-category``), or the held-out chitchat prompts alone with
``--suite chitchat``.  ``--option KEY=VALUE`` passes an option to stream_generate for
every SS row (the default tree, ``--prune-threshold``, ``--dynamic``, ``--tree-topk``,
``--row``); ``--row NAME KEY=VALUE ...`` adds an SS row with options of its own on top.

With ``--peers``: prompt lookup (our runtime), Medusa heads trained on the same data
(``--medusa``, a streams folder from scripts/train_baselines.sh), mlx-lm's two-model
speculative decoding with a draft made from the target (``--draft``, the distilled
6-layer draft from the same script; else the undistilled first layers), and mlx-lm
autoregressive in a child process without this project's GEMM shim (what mlx-lm
runs at with plain OpenBLAS).

Every method decodes the same chat prompts greedily on the same machine; prompts are
interleaved (each prompt runs every method before the next prompt) so that drift of the
machine hits all methods alike.  Prints a table (tokens/s, ratio to mlx-lm, tokens per
forward pass, whether the output equals mlx-lm's), then per method a table per prompt
category (tokens/s, ratios to mlx-lm and to our autoregressive mode in the same run,
tokens per pass, acceptance per depth), and writes them as markdown, JSON and PNG to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream.files import atomic_write, atomic_write_text

import mlx.core as mx
from common import (
    Run,
    Tally,
    add_option_args,
    add_suite_args,
    chat_ids,
    describe_suite,
    fmt_acceptance,
    format_options,
    load_pair,
    markdown_table,
    options_from_args,
    run_mlx_lm,
    run_ours,
    suite_from_args,
    tally_by_category,
)
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_lm_load

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row(Tally):
    """A method's tally over all prompts, with what the main table adds to it."""

    method: str = ""
    extra_parameters: int = 0
    peak_memory_gb: float = 0.0
    identical: int = 0
    extra: dict = field(default_factory=dict)


def child_mlx_lm(folder: str, prompts: list[list[int]], n: int) -> Row:
    """mlx-lm autoregressive in a fresh process with the GEMM shim off (plain OpenBLAS)."""
    import os
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    env = dict(os.environ, MLX_SPECSTREAM_SHIM="0")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-mlx-lm", folder,
           "--prompts-file", f.name, "--max-tokens", str(n)]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True,
                             timeout=3600)
    finally:
        os.unlink(f.name)
    row = Row(method="mlx-lm autoregressive, OpenBLAS without the shim (child process)")
    for toks, secs in json.loads(out.stdout.strip().splitlines()[-1]):
        passes = max(len(toks) - 1, 0)
        row.add(Run(toks, secs, passes, passes))
        row.extra["tokens"] = row.extra.get("tokens", []) + [toks]
    return row


def truncated_draft(folder: str, layers: int):
    """A draft sharing SmolLM2's tokenizer: its first ``layers`` layers, final norm and
    (tied) head, not trained further."""
    draft, _ = mlx_lm_load(folder)
    draft.model.layers = draft.model.layers[:layers]
    return draft


def _count(params: dict) -> int:
    return int(sum(v.size for v in params.values()))


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.method for r in rows]
    ax[0].barh(names, [r.tps for r in rows], color="tab:blue")
    ax[0].set_xlabel("tokens / s")
    ax[0].invert_yaxis()
    ax[1].barh(names, [r.tokens_per_pass for r in rows], color="tab:orange")
    ax[1].set_xlabel("tokens per forward pass")
    ax[1].invert_yaxis()
    ax[1].set_yticklabels([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110))


BASELINES = ("mlx-lm autoregressive", "ours autoregressive")


def category_table(by_cat: dict[str, Tally], mlx_lm: dict[str, Tally],
                   ours_ar: dict[str, Tally]) -> str:
    """One method per prompt category (and overall), with the ratios of its tokens/s to
    the two autoregressive baselines' on the same prompts."""

    def ratio(x: Tally, base: Tally) -> str:
        return f"{x.tps / base.tps:.2f}x" if base.tps else "n/a"

    return markdown_table(
        ["category", "prompts", "tokens", "tokens/s", "vs mlx-lm", "vs ours AR",
         "tokens/pass", "accepted per depth"],
        [[c, str(x.prompts), str(x.tokens), f"{x.tps:.2f}", ratio(x, mlx_lm[c]),
          ratio(x, ours_ar[c]), f"{x.tokens_per_pass:.2f}" if x.passes else "n/a",
          fmt_acceptance(x.acceptance)] for c, x in by_cat.items()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--streams-path", default=None, help="streams to use instead of the folder's")
    add_suite_args(p, per_category=3, chitchat_prompts=10)
    p.add_argument("--max-tokens", type=int, default=128)
    add_option_args(p, "SS row")
    p.add_argument("--no-pause", action="store_true",
                   help="turn the adaptive pause off (every speculative pass drafts)")
    p.add_argument("--tree-topk", action="append", default=None,
                   help="extra product trees to time, e.g. 3,2,1 (repeatable)")
    p.add_argument("--prune-threshold", type=float, default=None)
    p.add_argument("--tag", default="decode")
    p.add_argument("--peers", action="store_true",
                   help="also time prompt lookup and mlx-lm two-model speculative decoding")
    p.add_argument("--dynamic", action="store_true",
                   help="also time dynamic chains (sized per step from stream confidences)")
    p.add_argument("--draft-layers", type=int, default=6)
    p.add_argument("--draft", default="runs/baselines/draft6_distilled",
                   help="draft model folder for mlx-lm two-model decoding (if it exists)")
    p.add_argument("--medusa", default="runs/baselines/medusa_chat",
                   help="Medusa heads trained on the same data (a streams folder, if it exists)")
    p.add_argument("--child-mlx-lm", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_mlx_lm:  # the no-shim baseline, run by child_mlx_lm()
        m, t = mlx_lm_load(args.child_mlx_lm)
        ids = json.loads(Path(args.prompts_file).read_text())
        go = run_mlx_lm(m, t)
        go(ids[0][:32], 8)
        print(json.dumps([[r.tokens, r.seconds] for r in (go(x, args.max_tokens) for x in ids)]))
        return 0

    options, extra_rows = options_from_args(p, args)
    suite = suite_from_args(p, args)

    model, tokenizer, folder, ref_model = load_pair(args.model, args.streams_path)
    if args.no_pause:
        model.cfg = dataclasses.replace(model.cfg, draft_cost_ratio=0.0)
    prompts = [chat_ids(tokenizer, text) for _, text in suite]

    def ss(**kw) -> Callable[[list[int], int], Run]:
        """An SS row: our speculative decoding with --option and its own options."""
        return run_ours(model, tokenizer, **(options | kw))

    from mlx_specstream.decode import default_tree
    from mlx_specstream.tree import parse_tree_shape

    tree = default_tree(model.cfg)
    default_name = (f"SS calibrated tree ({tree.size} nodes)" if model.cfg.tree_paths is not None
                    else f"SS product tree {model.cfg.tree_topk}")
    methods: dict[str, Callable[[list[int], int], Run]] = {
        "mlx-lm autoregressive": run_mlx_lm(ref_model, tokenizer),
        "ours autoregressive": run_ours(model, tokenizer, speculative=False),
        default_name: ss(),
    }
    if args.prune_threshold:
        methods[f"{default_name} prune {args.prune_threshold}"] = ss(
            prune_threshold=args.prune_threshold)
    extra = {name: 0 for name in methods}
    extra[default_name] = _count(model.stream_parameters())
    if args.peers:
        from mlx_specstream import load as ss_load
        from mlx_specstream.decode import default_tree as dtree

        methods["ours prompt lookup"] = run_ours(model, tokenizer, drafter="lookup")
        extra["ours prompt lookup"] = 0
        if Path(args.medusa).exists():
            medusa, _ = ss_load(folder, streams_path=args.medusa)
            name = f"Medusa heads, calibrated tree ({dtree(medusa.cfg).size} nodes)"
            methods[name] = run_ours(medusa, tokenizer)
            extra[name] = _count(medusa.stream_parameters())
        if Path(args.draft).exists():
            draft, _ = mlx_lm_load(args.draft)
            name = f"mlx-lm two-model, distilled draft ({args.draft})"
        else:
            draft = truncated_draft(folder, args.draft_layers)
            name = f"mlx-lm two-model (draft = first {args.draft_layers} layers, undistilled)"
        methods[name] = run_mlx_lm(ref_model, tokenizer, draft_model=draft, num_draft_tokens=3)
        extra[name] = sum(v.size for _, v in tree_flatten(draft.parameters()))
    if args.dynamic:
        methods["SS dynamic chain"] = ss(dynamic_tree=True)
        extra["SS dynamic chain"] = extra[default_name]
    for spec in args.tree_topk or []:
        topk = parse_tree_shape(spec)
        methods[f"SS product tree {topk}"] = ss(tree_topk=topk)
        extra[f"SS product tree {topk}"] = extra[default_name]
    for name, opts in extra_rows:
        if name in methods:
            p.error(f"--row {name!r}: a row of that name exists already")
        methods[name] = ss(**opts)
        # prompt lookup or plain decoding read no stream parameters
        plain = opts.get("drafter") == "lookup" or opts.get("speculative") is False
        extra[name] = 0 if plain else extra[default_name]

    rows = {name: Row(method=name, extra_parameters=extra.get(name, 0)) for name in methods}
    base_gb = sum(v.nbytes for _, v in tree_flatten(ref_model.parameters())) / 1e9
    weights_gb = {name: base_gb + 4 * extra.get(name, 0) / 1e9 for name in methods}
    # warm-up (allocations, first-call costs)
    for go in methods.values():
        go(prompts[0][:32], 8)
    refs: list[list[int]] = []
    runs: dict[str, list[tuple[str, Run]]] = {name: [] for name in methods}
    for i, ((cat, _), ids) in enumerate(zip(suite, prompts, strict=True)):
        ref = None
        for name, go in methods.items():
            mx.reset_peak_memory()
            before = mx.get_active_memory()
            r = go(ids, args.max_tokens)
            # the method's weights + what decoding allocated on top of what was resident
            work = (mx.get_peak_memory() - before) / 1e9
            rows[name].peak_memory_gb = max(rows[name].peak_memory_gb,
                                            weights_gb[name] + work)
            if ref is None:
                ref = r.tokens
                refs.append(ref)
            rows[name].add(r)
            rows[name].identical += int(r.tokens == ref)
            runs[name].append((cat, r))
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr)

    if args.peers:
        child = child_mlx_lm(folder, prompts, args.max_tokens)
        toks = child.extra.pop("tokens")
        child.identical = sum(int(t == r) for t, r in zip(toks, refs, strict=True))
        rows[child.method] = child
    base_tps = rows["mlx-lm autoregressive"].tps
    lines = [
        "| method | tokens/s | vs mlx-lm | tokens/pass | extra params | peak memory GB "
        "| output = mlx-lm |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        same = f"{r.identical}/{r.prompts}" if r.identical or r.passes else "n/a"
        mem = f"{r.peak_memory_gb:.2f}" if r.peak_memory_gb else "n/a"
        lines.append(
            f"| {r.method} | {r.tps:.2f} | {r.tps / base_tps:.2f}x | "
            f"{f'{r.tokens_per_pass:.2f}' if r.passes else 'n/a'} | {r.extra_parameters:,} | "
            f"{mem} | {same} |"
        )
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"{describe_suite(suite)} x {args.max_tokens} tokens, greedy, "
              f"{Path(folder).name}, {machine}, {mx.default_device()}, {stamp}"
              + (f"; streams: {args.streams_path}" if args.streams_path else "")
              + ("; adaptive pause off" if args.no_pause else "")
              + (f"; options of the SS rows: {format_options(options)}" if options else ""))
    by_cat = {name: tally_by_category(rs) for name, rs in runs.items()}
    sections = [f"### {name}, per category\n\n"
                + category_table(by_cat[name], *(by_cat[b] for b in BASELINES))
                for name in methods if name not in BASELINES]
    text = header + "\n\n" + "\n".join(lines) + "\n\n" + "\n\n".join(sections) + "\n"
    print(text, end="")
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{args.tag}.json", json.dumps(
        {"header": header, "options": options,
         "rows": [asdict(r) | {"tps": r.tps, "tokens_per_pass": r.tokens_per_pass}
                  for r in rows.values()],
         "per_category": {name: {c: asdict(t) | {"tps": t.tps,
                                                 "tokens_per_pass": t.tokens_per_pass,
                                                 "acceptance_per_depth": t.acceptance}
                                 for c, t in cats.items()}
                          for name, cats in by_cat.items()}},
        indent=2))
    atomic_write_text(RESULTS / f"{args.tag}.md", text)
    plot(list(rows.values()), RESULTS / f"{args.tag}.png", header)
    print(f"wrote {RESULTS / args.tag}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
