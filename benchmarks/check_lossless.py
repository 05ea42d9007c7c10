"""Greedy Speculative Streaming checked against mlx-lm token by token (``mlx_specstream.
lossless``): one prompt per category of the broad suite, our greedy output teacher-forced
through mlx-lm's ``generate_step``, every token that is not mlx-lm's argmax reported with
its margin.  Also the row noise: how much a row's logits change between a pass over 16
rows and 16 one-row passes of mlx-lm's model (the shim makes it 0 on this CPU).

    python benchmarks/check_lossless.py --label NAME [--model PATH] [--dtype bfloat16]
        [--simulate-rows [DTYPE]] [--max-tokens 64] [--per-category 1]
        [--output benchmarks/results/tolerance_bf16_cpu]

Each run is stored under its label in OUTPUT.json (other labels are kept) and OUTPUT.md
is rewritten from all of them.  ``MLX_SPECSTREAM_SHIM=0`` in the environment runs without
the row-invariant GEMM shim; ``--simulate-rows`` computes multi-row products by a split-K
kernel (``lossless.row_dependent_rounding``), a stand-in for a GPU's kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream import backend, load, stream_generate
from mlx_specstream.files import atomic_write_text
from mlx_specstream.lossless import (
    check_greedy,
    logits_dtype,
    row_dependent_rounding,
    ulp,
)

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import chat_ids, load_suite, markdown_table  # noqa: E402

ROW_NOISE_ROWS = 16


def row_noise(base, prompt: list[int], follow: list[int], dtype: str) -> dict[str, float]:
    """Largest |change| of a logit between one pass over ``follow`` and one-row passes,
    after the prompt, in logits and in ulps of ``dtype`` at the row's top logit."""
    follow = follow[:ROW_NOISE_ROWS]

    def prefilled():
        cache = make_prompt_cache(base)
        base(mx.array(prompt)[None], cache=cache)
        mx.eval([c.state for c in cache])
        return cache

    cache = prefilled()
    multi = base(mx.array(follow)[None], cache=cache)[0].astype(mx.float32)
    cache = prefilled()
    single = mx.stack([base(mx.array([t])[None], cache=cache)[0, -1].astype(mx.float32)
                       for t in follow])
    m, s = np.array(multi), np.array(single)
    d = np.abs(m - s).max(axis=1)
    steps = np.array([ulp(float(np.abs(r).max()), dtype) for r in s])
    return {"rows": len(follow), "max_logits": float(d.max()),
            "max_ulps": float((d / steps).max())}


def run(args: argparse.Namespace) -> dict:
    model, tokenizer = load(args.model)
    if args.dtype:
        model.set_dtype(getattr(mx, args.dtype))
        mx.eval(model.parameters())
    dtype = args.simulate_rows or logits_dtype(model.base)
    sim = (row_dependent_rounding(getattr(mx, args.simulate_rows)) if args.simulate_rows
           else contextlib.nullcontext())
    prompts = load_suite(per_category=args.per_category)
    rows, divergences, noise = [], [], []
    report = None
    t0 = time.perf_counter()
    with sim:
        for category, text in prompts:
            ids = chat_ids(tokenizer, text)
            tokens = [r.token for r in stream_generate(model, tokenizer, ids, args.max_tokens)]
            rep = check_greedy(model, ids, tokens, dtype=dtype)
            report = rep if report is None else report.merge(rep)
            noise.append(row_noise(model.base, ids, tokens, dtype))
            rows.append({"category": category, "tokens": len(tokens),
                         "divergences": len(rep.divergences), "passed": rep.passed,
                         "row_noise_ulps": noise[-1]["max_ulps"]})
            for d in rep.divergences:
                divergences.append({
                    "category": category, **d.__dict__,
                    "token_text": tokenizer.decode([d.token]),
                    "argmax_text": tokenizer.decode([d.argmax]),
                    "first": d.position == rep.divergences[0].position,
                })
            print(f"{category:12s} {rep.summary()}", flush=True)
    assert report is not None
    return {
        "label": args.label,
        "model": str(args.model or "default"),
        "dtype": logits_dtype(model.base),
        "tolerance_dtype": dtype,
        "tolerance_ulps": report.tolerance_ulps,
        "shim": backend.report()["shim"]["state"],
        "simulate_rows": args.simulate_rows,
        "max_tokens": args.max_tokens,
        "prompts": len(prompts),
        "tokens": report.n_tokens,
        "divergences": len(report.divergences),
        "unexplained": len(report.unexplained),
        "max_margin": report.max_margin,
        "max_ulps": report.max_ulps,
        "passed": report.passed,
        "row_noise_max_logits": max(n["max_logits"] for n in noise),
        "row_noise_max_ulps": max(n["max_ulps"] for n in noise),
        "per_prompt": rows,
        "divergence_list": divergences,
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": f"{platform.system()} {platform.machine()}, mlx {mx.__version__}",
        "command": command_line(),
    }


def command_line() -> str:
    env = [f"{k}={os.environ[k]}" for k in ("MLX_SPECSTREAM_SHIM",) if k in os.environ]
    return shlex.join([*env, "python", *sys.argv])


def markdown(runs: dict[str, dict]) -> str:
    head = ["run", "dtype", "shim", "simulated rows", "tokens", "not argmax",
            "beyond 2 x row noise", "max margin (logits)", "max margin (ulps)",
            "tolerance (ulps)", "check",
            "row noise (logits / ulps)"]
    table = [[r["label"], r["dtype"], r["shim"], r["simulate_rows"] or "-", str(r["tokens"]),
              str(r["divergences"]), str(r.get("unexplained", "-")),
              f"{r['max_margin']:.4g}", f"{r['max_ulps']:.3g}",
              f"{r['tolerance_ulps']:g} ({r['tolerance_dtype']})",
              "pass" if r["passed"] else "FAIL",
              f"{r['row_noise_max_logits']:.3g} / {r['row_noise_max_ulps']:.3g}"]
             for r in runs.values()]
    divs = [[r["label"], d["category"], str(d["position"]),
             f"{d['token']} {d['token_text']!r}", f"{d['argmax']} {d['argmax_text']!r}",
             f"{d['margin']:.4g}", f"{d['ulps']:.3g}", f"{d['top_logit']:.3g}",
             "-" if d.get("row_noise") is None else f"{2 * d['row_noise']:.3g}",
             "yes" if d["first"] else "no"]
            for r in runs.values() for d in r["divergence_list"]]
    first = next(iter(runs.values()))
    out = [
        "# Greedy output against mlx-lm, token by token",
        "",
        f"SmolLM2-135M-Instruct with the shipped streams, greedy Speculative Streaming "
        f"(the folder's tree and context drafts), {first['prompts']} prompts of the broad "
        f"suite (one per category) x {first['max_tokens']} tokens, {first['machine']}.  "
        "Every emitted token was teacher-forced through mlx-lm's `generate_step` "
        "(`mlx_specstream.lossless.check_greedy`); \"not argmax\" counts the tokens that "
        "are not mlx-lm's greedy choice after the same prefix.  A margin is the logit of "
        "mlx-lm's choice minus the logit of ours; an ulp is the dtype's rounding step at "
        "the top logit (bfloat16 at |z| in [16, 32): 0.125).  Row noise: the largest change "
        "of any logit of a row between one pass over 16 rows and 16 one-row passes of "
        "mlx-lm's model.  \"simulated rows\": multi-row products by a split-K kernel with "
        "partial sums in that dtype (`lossless.row_dependent_rounding`).  The bf16 folder "
        "is the default model's GGUF converted with `convert.convert(..., dtype=\"bfloat16\")` "
        "and the shipped streams (`default_model.refresh_streams`).",
        "",
        markdown_table(head, table),
        "",
    ]
    if divs:
        out += ["## Divergences", "",
                "\"first\": the output's first divergence (later ones follow our own "
                "prefix, which mlx-lm's output no longer shares).  \"2 x row noise there\": "
                "twice the largest change of a logit at that position between a pass over "
                "its last 16 tokens and one-row passes (`lossless.row_noise`); a margin "
                "below it is explained by rounding.", "",
                markdown_table(["run", "category", "position", "ours", "mlx-lm's",
                                "margin (logits)", "ulps", "top logit",
                                "2 x row noise there", "first"], divs), ""]
    out += ["Commands:", ""] + [f"    {r['command']}" for r in runs.values()] + [""]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", required=True, help="name of this run in the report")
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the loaded model to this dtype")
    p.add_argument("--simulate-rows", nargs="?", const="bfloat16", default=None,
                   choices=("float32", "bfloat16", "float16"),
                   help="multi-row products by a split-K kernel, partial sums in DTYPE")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--output", default="benchmarks/results/tolerance_bf16_cpu",
                   help="OUTPUT.json and OUTPUT.md")
    args = p.parse_args()
    result = run(args)
    out = Path(args.output)
    runs: dict[str, dict] = {}
    if out.with_suffix(".json").exists():
        runs = json.loads(out.with_suffix(".json").read_text())
    runs[args.label] = result
    atomic_write_text(out.with_suffix(".json"), json.dumps(runs, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(runs))
    print(f"{args.label}: {result['tokens']} tokens, {result['divergences']} not argmax, "
          f"max margin {result['max_margin']:.4g} ({result['max_ulps']:.3g} ulps), "
          f"{'pass' if result['passed'] else 'FAIL'}; {result['seconds']} s")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
