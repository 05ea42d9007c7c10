"""The task-mode reproduction of the paper's Table 1 on a text-to-SQL task.

Three fine-tunes of the same base (scripts/train_baselines.sh trains them; each is
fused into a model folder): plain LoRA (decoded autoregressively), Speculative
Streaming (LoRA + streams) and Medusa (LoRA + heads), both decoded with their draft
trees.  For each: exact-match and execution accuracy on the held-out questions, decode
tokens/s, speed-up over mlx-lm's autoregressive generate on the same folder, and the
call-reduction ratio (generated tokens per target forward pass).

    python benchmarks/bench_sql.py [--runs runs/baselines] [--examples 100]

Prints a table and writes benchmarks/results/sql.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream import load
from mlx_specstream.calibrate import calibrate_folder
from mlx_specstream.files import atomic_write, atomic_write_text

import mlx.core as mx
from common import Tally, run_mlx_lm, run_ours
from mlx_lm.utils import load as mlx_lm_load
from sql_data import normalize_sql, same_result

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {  # name -> (fused folder under --runs, speculative)
    "LoRA (autoregressive)": ("sql_lora_model", False),
    "Medusa heads + LoRA": ("sql_medusa_model", True),
    "Speculative Streaming": ("sql_ss_model", True),
}


def prompts_of(split: Path, n: int | None) -> list[dict]:
    rows = [json.loads(line) for line in split.read_text().splitlines() if line.strip()]
    return rows[:n] if n else rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/baselines")
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--recalibrate", action="store_true",
                   help="size the trees again on this machine (else only when missing)")
    p.add_argument("--tag", default="sql")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    data = runs / "sql"
    tests = prompts_of(data / "test.jsonl", args.examples)
    valid = prompts_of(data / "valid.jsonl", 24)
    con = sqlite3.connect(str(data / "tables.sqlite"))

    results = []
    for name, (sub, spec) in METHODS.items():
        folder = runs / sub
        if not folder.exists():
            print(f"skipping {name}: {folder} not found (scripts/train_baselines.sh)")
            continue
        cfg = json.loads((folder / "config.json").read_text()).get("speculative_streaming", {})
        if spec and (args.recalibrate or not cfg.get("tree_paths")):
            calibrate_folder(folder, prompts=[r["messages"][0]["content"] for r in valid],
                             max_tokens=args.max_tokens, progress=False)
        model, tok = load(folder)
        ref, _ = mlx_lm_load(str(folder))
        extra_parameters = (int(sum(v.size for v in model.stream_parameters().values()))
                            if spec else 0)
        tree_nodes = None
        if spec:
            from mlx_specstream.decode import default_tree

            tree_nodes = default_tree(model.cfg).size
        warm = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                       add_generation_prompt=True)
        run_ref, run_spec = run_mlx_lm(ref, tok), run_ours(model, tok)
        run_ref(warm, 4)
        run_spec(warm, 4)
        ours, ar = Tally(), Tally()
        exact = execution = identical = 0
        for ex in tests:
            ids = tok.apply_chat_template(ex["messages"][:1], add_generation_prompt=True)
            gold = ex["messages"][1]["content"]
            ar_run = run_ref(ids, args.max_tokens)
            run = run_spec(ids, args.max_tokens) if spec else ar_run
            text = tok.decode(run.tokens)
            exact += int(normalize_sql(text) == normalize_sql(gold))
            execution += int(same_result(con, text, gold))
            identical += int(run.tokens == ar_run.tokens)
            ours.add(run)
            ar.add(ar_run)
        row = {"method": name, "folder": str(folder), "examples": ours.prompts, "exact": exact,
               "execution": execution, "tokens": ours.tokens, "seconds": ours.seconds,
               "ar_seconds": ar.seconds, "ar_tokens": ar.tokens, "passes": ours.passes,
               "step_tokens": ours.step_tokens, "identical": identical,
               "extra_parameters": extra_parameters, "tree_nodes": tree_nodes,
               "tps": ours.tps, "ar_tps": ar.tps, "speedup": ours.tps / ar.tps,
               "call_reduction": ours.step_tokens / max(ours.passes, 1)}
        results.append(row)
        print(f"{name}: exact {row['exact']}/{row['examples']}, speed-up {row['speedup']:.2f}x",
              file=sys.stderr)
        del model, ref
        mx.clear_cache()

    lines = ["| method | exact match | execution acc. | tokens/s | speed-up vs mlx-lm AR "
             "| call reduction (tokens/pass) | tree nodes | extra params | output = AR |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        n = r["examples"]
        lines.append(
            f"| {r['method']} | {r['exact'] / n:.3f} | {r['execution'] / n:.3f} | "
            f"{r['tps']:.1f} | {r['speedup']:.2f}x | {r['call_reduction']:.2f} | "
            f"{r['tree_nodes'] or 1} | {r['extra_parameters']:,} | {r['identical']}/{n} |")
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (f"text-to-SQL (vega_datasets tables), {len(tests)} held-out questions, greedy, "
              f"<= {args.max_tokens} tokens, SmolLM2-135M-Instruct fp32 + task-mode LoRA, "
              f"{machine}, {mx.default_device()}, {stamp}")
    print(header)
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{args.tag}.json", json.dumps({"header": header, "rows": results},
                                                         indent=2))
    atomic_write_text(RESULTS / f"{args.tag}.md", header + "\n\n" + "\n".join(lines) + "\n")
    plot(results, RESULTS / f"{args.tag}.png", header)
    print(f"wrote {RESULTS / args.tag}.{{json,md,png}}")
    return 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    names = [r["method"] for r in rows]
    ax[0].barh(names, [r["speedup"] for r in rows], color="tab:green")
    ax[0].axvline(1.0, color="gray", ls="--")
    ax[0].set_xlabel("speed-up over mlx-lm autoregressive")
    ax[1].barh(names, [r["call_reduction"] for r in rows], color="tab:orange")
    ax[1].set_xlabel("call reduction (tokens per pass)")
    ax[2].barh(names, [r["execution"] / r["examples"] for r in rows], color="tab:blue")
    ax[2].set_xlabel("execution accuracy")
    for a in ax:
        a.invert_yaxis()
    for a in ax[1:]:
        a.set_yticklabels([])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110))


if __name__ == "__main__":
    sys.exit(main())
