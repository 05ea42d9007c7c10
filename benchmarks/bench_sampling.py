"""Speculative Streaming with sampling: tokens per forward pass and speed at several
temperatures, against mlx-lm's own autoregressive sampling.

    python benchmarks/bench_sampling.py [--model PATH] [--prompts 30] [--max-tokens 128]
                                        [--temps 0,0.7,1.0] [--ref-temp 0.7] [--ours-ar]

Every method decodes the same held-out chat prompts on the same machine, interleaved
(each prompt runs every method before the next one) so that drift hits all alike.
Prompt i is seeded with seed i in every method.  The reference is mlx-lm's
``generate_step`` with ``make_sampler(temp=ref_temp)``.  Prints a table (tokens/s,
ratio to the reference, tokens per forward pass, acceptance per depth) and writes
JSON + Markdown to benchmarks/results/.
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
from mlx_specstream import stream_generate

import mlx.core as mx
from common import chat_prompts, load_pair
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Run:
    tokens: int  # generated tokens after the first (the first comes from the prefill)
    seconds: float  # from the first generated token to the last
    passes: int  # forward passes after the prefill
    accepted: list[int] = field(default_factory=list)
    step_tokens: int = 0  # tokens those passes produced (DecodeStats.step_tokens, EOS included)


@dataclass
class Row:
    method: str
    tokens: int = 0
    seconds: float = 0.0
    passes: int = 0
    step_tokens: int = 0
    accepted: list[int] = field(default_factory=list)

    def add(self, r: Run) -> None:
        self.tokens += r.tokens
        self.seconds += r.seconds
        self.passes += r.passes
        self.step_tokens += r.step_tokens
        if r.accepted:
            if len(self.accepted) < len(r.accepted):
                self.accepted += [0] * (len(r.accepted) - len(self.accepted))
            for d, a in enumerate(r.accepted):
                self.accepted[d] += a

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """DecodeStats.tokens_per_pass over the runs: tokens of the passes after the prefill."""
        return self.step_tokens / self.passes if self.passes else 0.0

    def acceptance(self) -> str:
        if not self.accepted or not self.passes:
            return "-"
        return " ".join(f"{100.0 * a / self.passes:.0f}%" for a in self.accepted)


Method = Callable[[list[int], int, int], Run]


def run_mlx_lm(model, eos: set[int], temp: float) -> Method:
    def go(ids: list[int], n: int, seed: int) -> Run:
        mx.random.seed(seed)
        count, t0 = 0, None
        for tok, _ in generate_step(mx.array(ids), model, max_tokens=n, sampler=make_sampler(temp)):
            if t0 is None:
                t0 = time.perf_counter()
            if int(tok) in eos:
                break
            count += 1
        return Run(max(count - 1, 0), time.perf_counter() - t0, max(count - 1, 0))

    return go


def run_ours(model, tokenizer, **opts) -> Method:
    eos = set(tokenizer.eos_token_ids)

    def go(ids: list[int], n: int, seed: int) -> Run:
        count, t0, last = 0, None, None
        for r in stream_generate(model, tokenizer, ids, n, seed=seed, **opts):
            if t0 is None:
                t0 = time.perf_counter()
            last = r
            if r.token not in eos:
                count += 1
        passes = last.forward_passes if last else 0
        step_tokens = round(last.tokens_per_pass * passes) if last else 0
        accepted = list(last.accepted_per_depth) if last else []
        return Run(max(count - 1, 0), time.perf_counter() - t0, passes, accepted, step_tokens)

    return go


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temps", default="0,0.7,1.0", help="comma-separated temperatures")
    p.add_argument("--ref-temp", type=float, default=0.7, help="mlx-lm reference temperature")
    p.add_argument("--ours-ar", action="store_true", help="also time our autoregressive sampling")
    p.add_argument("--tag", default="sampling")
    args = p.parse_args(argv)
    temps = [float(t) for t in args.temps.split(",") if t.strip()]

    model, tokenizer, folder, ref_model = load_pair(args.model)
    prompts = chat_prompts(tokenizer, args.prompts)

    ref_name = f"mlx-lm autoregressive temp {args.ref_temp}"
    methods: dict[str, Method] = {
        ref_name: run_mlx_lm(ref_model, set(tokenizer.eos_token_ids), args.ref_temp)
    }
    if args.ours_ar:
        methods[f"ours autoregressive temp {args.ref_temp}"] = run_ours(
            model, tokenizer, speculative=False, temp=args.ref_temp
        )
    for t in temps:
        methods[f"SS temp {t}"] = run_ours(model, tokenizer, temp=t)

    rows = {name: Row(name) for name in methods}
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
    for r in rows.values():
        ratio = r.tps / base if base else 0.0
        lines.append(
            f"| {r.method} | {r.tps:.2f} | {ratio:.2f}x | {r.tokens_per_pass:.2f} | "
            f"{r.acceptance()} |"
        )
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"{len(prompts)} held-out chitchat prompts x {args.max_tokens} tokens, sampling "
        f"(seed = prompt index), {Path(folder).name}, {machine}, {mx.default_device()}, {stamp}"
    )
    print(header)
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "header": header,
        "rows": [
            asdict(r) | {"tps": r.tps, "tokens_per_pass": r.tokens_per_pass} for r in rows.values()
        ],
    }
    (RESULTS / f"{args.tag}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{args.tag}.md").write_text(header + "\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {RESULTS / args.tag}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
