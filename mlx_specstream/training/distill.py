"""Write self-distillation data: the base model's own answers to chat prompts.

Prompts come from real offline sources (``--sources``: chitchat first and later turns
with their history, chatterbot-corpus questions, tasks over standard-library passages;
see ``sources.py``), from files (``--prompts``), and from the model itself
(``--self-instruct N``: user requests the model writes when given its chat template up
to a user turn; ``--follow-ups N``: a further user turn written after N of the answered
conversations, then answered too).  Answers are greedy (the lossless target: exactly
what decoding will produce); ``--sampled-fraction`` of the prompts are answered again
at ``--temp`` for sampled decoding.

Output: chat ``messages`` records in OUTPUT/train.jsonl and OUTPUT/valid.jsonl (every
20th prompt goes to valid); the model's own requests are kept in OUTPUT/requests.jsonl
and OUTPUT/followups.jsonl.  Generation is batched (mlx-lm's BatchGenerator) and
records are appended as they finish, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

VALID_EVERY = 20  # prompt i goes to valid.jsonl when i % VALID_EVERY == VALID_EVERY - 1
DEFAULT_SOURCES = "chitchat-turns,chatterbot,passages"

Conversation = list[dict[str, str]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--output", required=True, help="folder for train.jsonl / valid.jsonl")
    p.add_argument("--sources", default=None,
                   help="comma-separated offline prompt sources: chitchat, chitchat-turns, "
                        f"chatterbot, passages (default: {DEFAULT_SOURCES}; 'none' for none; "
                        "chitchat alone when neither --prompts nor --self-instruct is given)")
    p.add_argument("--num-prompts", type=int, default=2000,
                   help="prompts to take from each source")
    p.add_argument("--prompts", action="append", default=[],
                   help="a .txt (one prompt a line) or .jsonl ({'prompt'} or {'messages'}) "
                        "file of prompts to answer (repeatable)")
    p.add_argument("--self-instruct", type=int, default=0, metavar="N",
                   help="N user requests written by the model itself, then answered")
    p.add_argument("--tasks", default=None, metavar="MIX",
                   help="kinds of self-instruct requests, comma-separated, each with an "
                   "optional weight, e.g. coding=4,explaining,lists (default: every kind "
                   "once: writing, explaining, coding, reasoning, advice, lists, rewriting, "
                   "knowledge, chat)")
    p.add_argument("--code-texts", type=int, default=0, metavar="N",
                   help="add N functions of the Python standard library as plain-text "
                   "training records (real code, not the model's answers; train.jsonl only)")
    p.add_argument("--follow-ups", type=int, default=0, metavar="N",
                   help="N follow-up requests written after answered self-instruct "
                        "conversations, then answered")
    p.add_argument("--sampled-fraction", type=float, default=0.0,
                   help="answer this fraction of the prompts a second time at --temp")
    p.add_argument("--temp", type=float, default=0.7, help="temperature of sampled answers")
    p.add_argument("--seed", type=int, default=0, help="seed of prompt order and sampling")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per answer")
    p.add_argument("--batch-size", type=int, default=32, help="sequences decoded together")
    p.add_argument("--max-prompt-tokens", type=int, default=512,
                   help="skip prompts longer than this (after the chat template)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_prompts(path: str | Path) -> list[Conversation]:
    """Conversations ending in a user turn from a .txt (one prompt a line) or .jsonl
    file (``{"prompt"}``, or ``{"messages"}`` whose last assistant turn, if any, is
    dropped)."""
    path = Path(path)
    if path.suffix != ".jsonl":
        return [_user(line) for line in path.read_text().splitlines() if line.strip()]
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        d = json.loads(line)
        if "prompt" in d:
            out.append(_user(d["prompt"]))
            continue
        msgs = list(d.get("messages") or [])
        while msgs and msgs[-1].get("role") == "assistant":
            msgs.pop()
        if not msgs or msgs[-1].get("role") != "user":
            raise ValueError(f"{path}:{n}: expected 'prompt' or 'messages' ending in a user turn")
        out.append(msgs)
    return out


def _user(text: str) -> Conversation:
    return [{"role": "user", "content": text}]


def _key(messages: Conversation, temp: float) -> str:
    return json.dumps([messages, temp], ensure_ascii=False)


def _truncate_partial_line(f: Path) -> None:
    """Drop an unterminated last line left by an interrupted write."""
    if f.exists():
        data = f.read_bytes()
        if data and not data.endswith(b"\n"):
            f.write_bytes(data[: data.rfind(b"\n") + 1])


def read_records(output: Path) -> list[dict[str, Any]]:
    """The records of OUTPUT's train.jsonl and valid.jsonl (a partial last line dropped)."""
    out = []
    for split in ("train", "valid"):
        f = output / f"{split}.jsonl"
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def done_prompts(output: Path) -> set[str]:
    """Keys of the (conversation, temperature) pairs already answered in OUTPUT."""
    return {_key(r["messages"][:-1], float(r.get("temp", 0.0)))
            for r in read_records(output) if r.get("messages")}


def write_code_texts(output: str | Path, n: int, seed: int = 0) -> dict[str, int]:
    """Append the first ``n`` of ``sources.code_texts`` not yet in OUTPUT/train.jsonl as
    ``{"text", "source"}`` records (never to valid.jsonl: validation holds the model's own
    greedy answers, what decoding produces)."""
    from .sources import code_texts

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    f = output / "train.jsonl"
    _truncate_partial_line(f)
    have = {r.get("source") for r in read_records(output) if "text" in r}
    items = code_texts(n, seed)
    todo = [(src, code) for src, code in items if src not in have]
    with f.open("a") as fh:
        for src, code in todo:
            fh.write(json.dumps({"text": code, "source": src}) + "\n")
    return {"written": len(todo), "already_done": len(items) - len(todo),
            "available": len(items)}


def distill(
    base: Any,
    tokenizer: Any,
    prompts: list[str] | list[Conversation],
    output: str | Path,
    max_tokens: int = 128,
    batch_size: int = 32,
    max_prompt_tokens: int = 512,
    progress: bool = True,
    temps: list[float] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Answer ``prompts`` (strings, or conversations ending in a user turn) with the
    mlx-lm model ``base``, appending to OUTPUT: greedily, or at ``temps[i]`` when given
    (0 = greedy).  Returns counts.  Prompts already answered in OUTPUT are skipped."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    convs = [_user(p) if isinstance(p, str) else list(p) for p in prompts]
    temps = list(temps) if temps is not None else [0.0] * len(convs)
    if len(temps) != len(convs):
        raise ValueError("one temperature per prompt")
    files = {s: output / f"{s}.jsonl" for s in ("train", "valid")}
    for f in files.values():
        _truncate_partial_line(f)
    done = done_prompts(output)
    todo: list[tuple[int, Conversation, float, list[int]]] = []
    skipped_long = 0
    already = 0
    for i, (msgs, temp) in enumerate(zip(convs, temps, strict=True)):
        if _key(msgs, temp) in done:
            already += 1
            continue
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        if len(ids) > max_prompt_tokens:
            skipped_long += 1
            continue
        todo.append((i, msgs, temp, list(ids)))
    stats = {"already_done": already, "skipped_long": skipped_long, "written": 0,
             "tokens": 0, "truncated": 0, "seconds": 0.0}
    if not todo:
        return stats
    # Prompts are prefilled in groups padded to the longest: sort by length within blocks
    # of a few batches, so that groups are even while any prefix of the work still mixes
    # the sources.
    block = 4 * batch_size
    todo = [t for b in range(0, len(todo), block)
            for t in sorted(todo[b : b + block], key=lambda t: len(t[3]))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="distill", dynamic_ncols=True, file=sys.stderr)
    eos = set(tokenizer.eos_token_ids)
    mx_seed = random.Random(seed).randrange(1 << 30)
    samplers = {t: make_sampler(temp=t) for t in set(temps) if t > 0}
    gen = BatchGenerator(
        base,
        stop_tokens=[[t] for t in eos],
        completion_batch_size=batch_size,
        prefill_batch_size=min(batch_size, 8),
    )
    handles = {s: f.open("a") for s, f in files.items()}
    tic = time.perf_counter()
    try:
        import mlx.core as mx

        mx.random.seed(mx_seed)
        sampler_list = [samplers.get(t) for _, _, t, _ in todo]
        uids = gen.insert([t[3] for t in todo], [max_tokens] * len(todo),
                          samplers=sampler_list if any(sampler_list) else None)
        meta = dict(zip(uids, todo, strict=True))
        results: dict[int, list[int]] = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":
                    results[r.uid].append(r.token)
                if r.finish_reason is None:
                    continue
                i, msgs, temp, _ = meta[r.uid]
                ids = results.pop(r.uid)
                truncated = r.finish_reason != "stop"
                record: dict[str, Any] = {
                    "messages": [*msgs, {"role": "assistant", "content": tokenizer.decode(ids)}]
                }
                if truncated:
                    record["truncated"] = True
                if temp > 0:
                    record["temp"] = temp
                # valid holds greedy answers only: what greedy decoding produces
                held = temp == 0 and i % VALID_EVERY == VALID_EVERY - 1
                split = "valid" if held else "train"
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


def gather_prompts(args: argparse.Namespace) -> list[tuple[str, Conversation]]:
    """(source, conversation) pairs from --sources and --prompts, interleaved by source
    so that any prefix of the list mixes them."""
    from .sources import source_prompts

    names = args.sources
    if names is None:
        names = "chitchat" if not (args.prompts or args.self_instruct) else DEFAULT_SOURCES
    per_source: list[list[tuple[str, Conversation]]] = []
    for name in [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]:
        per_source.append([(name, c) for c in source_prompts(name, args.num_prompts, args.seed)])
    for f in args.prompts:
        per_source.append([(Path(f).name, c) for c in read_prompts(f)[: args.num_prompts]])
    out = []
    for k in range(max((len(s) for s in per_source), default=0)):
        out.extend(s[k] for s in per_source if k < len(s))
    return out


def run(args: argparse.Namespace) -> int:
    import warnings

    from ..generate import load
    from .selfinstruct import parse_tasks, write_requests

    if args.self_instruct < 0 or args.follow_ups < 0:
        raise ValueError("--self-instruct and --follow-ups take a count >= 0")
    if args.code_texts < 0:
        raise ValueError("--code-texts takes a count >= 0")
    tasks = parse_tasks(args.tasks)
    if not 0.0 <= args.sampled_fraction <= 1.0:
        raise ValueError("--sampled-fraction is a fraction in [0, 1]")
    from ..models import resolve_model

    model_path = resolve_model(args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = load(model_path)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    if args.code_texts:
        c = write_code_texts(out, args.code_texts, args.seed)
        print(f"code texts: {c['written']} functions of the standard library added, "
              f"{c['already_done']} already there")
    items = gather_prompts(args)
    if args.self_instruct:
        s = write_requests(model.base, tok, args.self_instruct, out / "requests.jsonl",
                           seed=args.seed, batch_size=max(args.batch_size, 32),
                           progress=progress, tasks=tasks)
        print(f"self-instruct: {s['written']} new requests ({s['rejected']} rejected), "
              f"{s['already_done']} already written")
        if s["stalled"]:
            print("self-instruct: warning: the model stopped writing usable requests "
                  "(is it a chat model?)", file=sys.stderr)
        requests = [json.loads(x)["messages"] for x in
                    (out / "requests.jsonl").read_text().splitlines()][: args.self_instruct]
        mixed: list[tuple[str, Conversation]] = []
        step = max(1, round(len(items) / max(len(requests), 1)))
        for k, r in enumerate(requests):  # spread the requests through the other prompts
            mixed.extend(items[k * step : (k + 1) * step])
            mixed.append(("self-instruct", r))
        items = mixed + items[len(requests) * step :]
    rng = random.Random(args.seed)
    convs = [c for _, c in items]
    temps = [0.0] * len(convs)
    sampled = [c for c in convs if rng.random() < args.sampled_fraction]
    stats = distill(model.base, tok, convs + sampled, out, args.max_tokens, args.batch_size,
                    args.max_prompt_tokens, progress=progress,
                    temps=temps + [args.temp] * len(sampled), seed=args.seed)
    _report(stats, args, out)
    if args.follow_ups:
        wanted = {json.dumps(r) for r in requests} if args.self_instruct else None
        histories = [r["messages"] for r in read_records(out)
                     if "temp" not in r and not r.get("truncated")
                     and len(r["messages"]) == 2
                     and (wanted is None or json.dumps(r["messages"][:1]) in wanted)]
        if not histories:
            raise ValueError("--follow-ups needs answered single-turn conversations")
        s = write_requests(model.base, tok, args.follow_ups, out / "followups.jsonl",
                           seed=args.seed + 1, batch_size=max(args.batch_size, 32),
                           histories=histories, progress=progress)
        print(f"follow-ups: {s['written']} new requests ({s['rejected']} rejected), "
              f"{s['already_done']} already written")
        followups = read_prompts(out / "followups.jsonl")[: args.follow_ups]
        stats = distill(model.base, tok, followups, out, args.max_tokens, args.batch_size,
                        args.max_prompt_tokens, progress=progress, seed=args.seed + 1)
        _report(stats, args, out)
    return 0


def _report(stats: dict[str, Any], args: argparse.Namespace, out: Path) -> None:
    tps = stats["tokens"] / max(stats["seconds"], 1e-9)
    print(f"distill: {stats['written']} new answers ({stats['tokens']} tokens, "
          f"{stats['truncated']} cut at {args.max_tokens}, {tps:.1f} tok/s), "
          f"{stats['already_done']} already done, {stats['skipped_long']} prompts too long; "
          f"in {out}")
