"""Write self-distillation data: the base model's own greedy answers to chat prompts.

Prompts default to the first user turns of the chitchat-dataset conversations (the
last 100 conversations are held out for evaluation and never used).  Output: chat
``messages`` records in OUTPUT/train.jsonl and OUTPUT/valid.jsonl (every 20th prompt
goes to valid).  Generation is batched (mlx-lm's BatchGenerator, greedy) and records
are appended as they finish, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

VALID_EVERY = 20  # prompt i goes to valid.jsonl when i % VALID_EVERY == VALID_EVERY - 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--output", required=True, help="folder for train.jsonl / valid.jsonl")
    p.add_argument("--num-prompts", type=int, default=2000, help="prompts to answer in all")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per answer")
    p.add_argument("--batch-size", type=int, default=32, help="sequences decoded together")
    p.add_argument("--prompts", default=None,
                   help="a .txt (one prompt a line) or .jsonl ({'prompt': ...}) file "
                        "instead of chitchat")
    p.add_argument("--max-prompt-tokens", type=int, default=256,
                   help="skip prompts longer than this (after the chat template)")
    p.add_argument("--no-progress", action="store_true")


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if path.suffix == ".jsonl":
        out = []
        for line in path.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                out.append(d["prompt"] if "prompt" in d else d["messages"][0]["content"])
        return out
    return [line for line in path.read_text().splitlines() if line.strip()]


def done_prompts(output: Path) -> set[str]:
    """Prompts already answered in OUTPUT (a partly written last line is ignored)."""
    done: set[str] = set()
    for split in ("train", "valid"):
        f = output / f"{split}.jsonl"
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            try:
                d = json.loads(line)
                done.add(d["messages"][0]["content"])
            except (json.JSONDecodeError, KeyError, IndexError):
                continue
    return done


def _truncate_partial_line(f: Path) -> None:
    """Drop an unterminated last line left by an interrupted write."""
    if f.exists():
        data = f.read_bytes()
        if data and not data.endswith(b"\n"):
            f.write_bytes(data[: data.rfind(b"\n") + 1])


def distill(
    base: Any,
    tokenizer: Any,
    prompts: list[str],
    output: str | Path,
    max_tokens: int = 128,
    batch_size: int = 32,
    max_prompt_tokens: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer ``prompts`` greedily with the mlx-lm model ``base``, appending to OUTPUT.
    Returns counts.  Prompts already present in OUTPUT are skipped."""
    from mlx_lm.generate import BatchGenerator

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    done = done_prompts(output)
    todo: list[tuple[int, str, list[int]]] = []
    skipped_long = 0
    for i, p in enumerate(prompts):
        if p in done:
            continue
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        if len(ids) > max_prompt_tokens:
            skipped_long += 1
            continue
        todo.append((i, p, list(ids)))
    files = {s: output / f"{s}.jsonl" for s in ("train", "valid")}
    for f in files.values():
        _truncate_partial_line(f)
    stats = {"already_done": len(done), "skipped_long": skipped_long, "written": 0,
             "tokens": 0, "truncated": 0, "seconds": 0.0}
    if not todo:
        return stats
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="distill", dynamic_ncols=True, file=sys.stderr)
    eos = set(tokenizer.eos_token_ids)
    gen = BatchGenerator(
        base,
        stop_tokens=[[t] for t in eos],
        completion_batch_size=batch_size,
        prefill_batch_size=min(batch_size, 8),
    )
    handles = {s: f.open("a") for s, f in files.items()}
    tic = time.perf_counter()
    try:
        uids = gen.insert([t[2] for t in todo], [max_tokens] * len(todo))
        meta = dict(zip(uids, todo, strict=True))
        results: dict[int, list[int]] = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":
                    results[r.uid].append(r.token)
                if r.finish_reason is None:
                    continue
                i, prompt, _ = meta[r.uid]
                ids = results.pop(r.uid)
                truncated = r.finish_reason != "stop"
                record = {
                    "messages": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": tokenizer.decode(ids)},
                    ]
                }
                if truncated:
                    record["truncated"] = True
                split = "valid" if i % VALID_EVERY == VALID_EVERY - 1 else "train"
                handles[split].write(json.dumps(record, ensure_ascii=False) + "\n")
                handles[split].flush()
                stats["written"] += 1
                stats["tokens"] += len(ids)
                stats["truncated"] += int(truncated)
                if bar is not None:
                    el = time.perf_counter() - tic
                    bar.set_postfix_str(f"{stats['tokens'] / max(el, 1e-9):.0f} tok/s")
                    bar.update(1)
    finally:
        gen.close()
        for h in handles.values():
            h.close()
        if bar is not None:
            bar.close()
    stats["seconds"] = time.perf_counter() - tic
    return stats


def run(args: argparse.Namespace) -> int:
    import warnings

    from ..generate import load
    from .data import chitchat_prompts

    model_path = args.model
    if model_path is None:
        from ..default_model import default_model_path

        model_path = default_model_path()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = load(model_path)
    prompts = read_prompts(args.prompts) if args.prompts else chitchat_prompts()[0]
    prompts = prompts[: args.num_prompts]
    stats = distill(model.base, tok, prompts, args.output, args.max_tokens, args.batch_size,
                    args.max_prompt_tokens, progress=not args.no_progress)
    tps = stats["tokens"] / max(stats["seconds"], 1e-9)
    print(f"distill: {stats['written']} new answers ({stats['tokens']} tokens, "
          f"{stats['truncated']} cut at {args.max_tokens}, {tps:.1f} tok/s), "
          f"{stats['already_done']} already done, {stats['skipped_long']} prompts too long; "
          f"in {args.output}")
    return 0
