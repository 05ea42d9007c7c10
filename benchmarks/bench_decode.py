"""Speculative Streaming against mlx-lm's autoregressive generate, in one run.

    python benchmarks/bench_decode.py [--model PATH] [--prompts 10] [--max-tokens 128]
    python benchmarks/bench_decode.py --peers --tag peers     # + every peer method

With ``--peers``: prompt lookup (our runtime), Medusa heads trained on the same data
(``--medusa``, a streams folder from scripts/train_baselines.sh), mlx-lm's two-model
speculative decoding with a draft made from the target (``--draft``, the distilled
6-layer draft from the same script; else the undistilled first layers), and mlx-lm
autoregressive in a child process without this project's GEMM shim (what mlx-lm
runs at with plain OpenBLAS).

Every method decodes the same chat prompts greedily on the same machine; prompts are
interleaved (each prompt runs every method before the next prompt) so that drift of the
machine hits all methods alike.  Prints a table (tokens/s, ratio to mlx-lm, tokens per
forward pass, whether the output equals mlx-lm's) and writes JSON + PNG to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)

import mlx.core as mx
from common import Run, chat_prompts, load_pair, run_mlx_lm, run_ours
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_lm_load

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    method: str
    extra_parameters: int = 0
    peak_memory_gb: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    passes: int = 0
    step_tokens: int = 0
    identical: int = 0
    prompts: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.step_tokens / self.passes if self.passes else 0.0


def run_mlx_lm_draft(model, draft, tokenizer, num_draft: int) -> Callable[[list[int], int], Run]:
    """mlx-lm's own two-model speculative decoding (greedy)."""
    from mlx_lm.generate import stream_generate as mlx_stream

    eos = set(tokenizer.eos_token_ids)

    def go(ids: list[int], n: int) -> Run:
        toks: list[int] = []
        t0 = None
        for r in mlx_stream(model, tokenizer, ids, max_tokens=n, draft_model=draft,
                            num_draft_tokens=num_draft):
            if t0 is None:
                t0 = time.perf_counter()
            if r.token in eos:
                break
            toks.append(r.token)
        # mlx-lm reports no pass count: the target runs once per draft round
        return Run(toks, time.perf_counter() - t0, 0)

    return go


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
    row = Row("mlx-lm autoregressive, OpenBLAS without the shim (child process)")
    for toks, secs in json.loads(out.stdout.strip().splitlines()[-1]):
        row.prompts += 1
        row.tokens += max(len(toks) - 1, 0)
        row.seconds += secs
        row.passes += max(len(toks) - 1, 0)
        row.step_tokens += max(len(toks) - 1, 0)
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
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=128)
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

    model, tokenizer, folder, ref_model = load_pair(args.model)
    prompts = chat_prompts(tokenizer, args.prompts)

    from mlx_specstream.decode import default_tree

    tree = default_tree(model.cfg)
    default_name = (f"SS calibrated tree ({tree.size} nodes)" if model.cfg.tree_paths is not None
                    else f"SS product tree {model.cfg.tree_topk}")
    methods: dict[str, Callable[[list[int], int], Run]] = {
        "mlx-lm autoregressive": run_mlx_lm(ref_model, tokenizer),
        "ours autoregressive": run_ours(model, tokenizer, speculative=False),
        default_name: run_ours(model, tokenizer),
    }
    if args.prune_threshold:
        methods[f"{default_name} prune {args.prune_threshold}"] = run_ours(
            model, tokenizer, prune_threshold=args.prune_threshold)
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
        methods[name] = run_mlx_lm_draft(ref_model, draft, tokenizer, 3)
        extra[name] = sum(v.size for _, v in tree_flatten(draft.parameters()))
    if args.dynamic:
        methods["SS dynamic chain"] = run_ours(model, tokenizer, dynamic_tree=True)
        extra["SS dynamic chain"] = extra[default_name]
    for spec in args.tree_topk or []:
        topk = [int(x) for x in spec.split(",")]
        methods[f"SS product tree {topk}"] = run_ours(model, tokenizer, tree_topk=topk)
        extra[f"SS product tree {topk}"] = extra[default_name]

    rows = {name: Row(name, extra_parameters=extra.get(name, 0)) for name in methods}
    base_gb = sum(v.nbytes for _, v in tree_flatten(ref_model.parameters())) / 1e9
    weights_gb = {name: base_gb + 4 * extra.get(name, 0) / 1e9 for name in methods}
    # warm-up (allocations, first-call costs)
    for go in methods.values():
        go(prompts[0][:32], 8)
    refs: list[list[int]] = []
    for i, ids in enumerate(prompts):
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
            row = rows[name]
            row.prompts += 1
            row.tokens += max(len(r.tokens) - 1, 0)  # the first token comes from the prefill
            row.seconds += r.seconds
            row.passes += r.passes
            row.step_tokens += r.step_tokens
            row.identical += int(r.tokens == ref)
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
    header = (f"{args.prompts} held-out chitchat prompts x {args.max_tokens} tokens, greedy, "
              f"{folder}, {machine}, {mx.default_device()}, {stamp}")
    print(header)
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(
        {"header": header, "rows": [asdict(r) | {"tps": r.tps, "tokens_per_pass":
                                                 r.tokens_per_pass} for r in rows.values()]},
        indent=2))
    (RESULTS / f"{args.tag}.md").write_text(header + "\n\n" + "\n".join(lines) + "\n")
    plot(list(rows.values()), RESULTS / f"{args.tag}.png", header)
    print(f"wrote {RESULTS / args.tag}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
