"""Size the draft tree by the measured cost of a forward pass on this machine.

Three measurements, then a choice:

* the cost curve: seconds of one pass as a function of the number of tree nodes (each
  node carries its streams through the MSA layers), next to the plain 1-token pass;
* the acceptance statistics: on a few prompts, greedy continuations are scored by the
  streams (teacher forcing, one pass per prompt); for every rank path (r1, ..., rd) the
  fraction of positions where stream 1's rank-r1 candidate, ..., stream d's rank-rd
  candidate are all the true tokens;
* the batch curve: seconds of a batched pass of B sequences with and without their
  stream rows (``batch_stream_costs``: when a batch runs the streams);
* the tree: the expected tokens per pass of the best tree with n nodes is 1 + the sum
  of the n-1 largest path probabilities (tree.best_paths); the chosen n maximises
  expected tokens per second = that / cost(n)  (Sequoia's idea, static per model and
  machine).  It is written into the folder's config as ``tree_paths``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .config import CONFIG_KEY
from .files import atomic_write, atomic_write_text
from .model import SpecStreamModel, causal_mask
from .tree import best_paths

CALIBRATION_FILE = "calibration.json"
# Up to 64 nodes: a batched pass carries every sequence's tree (8 sequences x 8 nodes),
# and its cost is read off this curve (see ``apply_result``).
DEFAULT_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
BATCH_SIZES = (1, 2, 4, 8)


def _filled_cache(model: SpecStreamModel, context: int, rng: np.random.Generator):
    """A single-sequence cache holding ``context`` random tokens."""
    cache = model.make_cache()
    tokens = rng.integers(0, model.args.vocab_size, context).astype(np.int32)
    model(mx.array(tokens), cache=cache, with_streams=False)
    cache.commit()
    mx.eval(cache.state_arrays())
    return cache


def measure_cost(
    model: SpecStreamModel,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    context: int = 256,
    repeat: int = 5,
    progress: bool = True,
) -> dict[str, object]:
    """Seconds (best of ``repeat``) of a speculative pass with n tree nodes, and of a plain pass."""
    V = model.args.vocab_size
    rng = np.random.default_rng(0)
    cache = _filled_cache(model, context, rng)

    def one_pass(n: int, streams: bool) -> float:
        toks = mx.array(rng.integers(0, V, (1, n)).astype(np.int32))
        off = cache.offset
        pos = mx.arange(off, off + n)
        mask = causal_mask(n) if n > 1 else None
        t = time.perf_counter()
        h = model.lower(toks, pos, mask=mask, cache=cache)
        main, sh = model.upper(h, pos, mask=mask, cache=cache, with_streams=streams)
        pred = mx.argmax(main[0], axis=-1)
        if sh is not None:  # the decoder reads out one node's streams per step
            mx.eval(pred, mx.argmax(model.draft_logits(sh[0, -1]), axis=-1))
        else:
            mx.eval(pred)
        np.array(pred)
        dt = time.perf_counter() - t
        cache.discard()  # nothing committed
        return dt

    def best_of(n: int, streams: bool) -> float:
        # the minimum: the cost of the pass itself, without other processes' noise
        one_pass(n, streams)
        return min(one_pass(n, streams) for _ in range(repeat))

    items = [(0, False)] + [(n, True) for n in sizes]
    out: dict[str, float] = {}
    ar = 0.0
    for n, streams in tqdm(items, desc="cost curve", disable=not progress, unit="size"):
        if not streams:
            ar = best_of(1, False)
        else:
            out[str(n)] = best_of(n, True)
    return {"autoregressive": ar, "tree": out, "context": context}


def measure_batch_cost(
    model: SpecStreamModel,
    batches: tuple[int, ...] = BATCH_SIZES,
    context: int = 256,
    repeat: int = 5,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Seconds (best of ``repeat``) of a batched pass of B sequences of one node each,
    without stream rows and with them (the streams' logits of every sequence and their
    sorted probabilities read, as the batch decoder reads them to size its trees)."""
    from .batching import BatchKVCache, _stream_confidence

    V, g = model.args.vocab_size, model.cfg.num_streams
    rng = np.random.default_rng(1)
    single = _filled_cache(model, context, rng)
    out: dict[str, dict[str, float]] = {"plain": {}, "streams": {}}
    for B in tqdm(batches, desc="batch cost", disable=not progress, unit="batch"):
        cache = BatchKVCache(model.num_layers)
        for _ in range(B):
            cache.add(single)
        mx.eval(cache.state_arrays())
        mask = mx.ones((B, 1, 1), dtype=mx.bool_)

        def one_pass(streams: bool, cache: BatchKVCache = cache, B: int = B,
                     mask: mx.array = mask) -> float:
            toks = mx.array(rng.integers(0, V, (B, 1)).astype(np.int32))
            pos = mx.array(cache.lengths[:, None].astype(np.int32))
            t = time.perf_counter()
            h = model.lower(toks, pos, mask, cache)
            x = model.upper_hidden(h, pos, mask, cache, with_streams=streams)
            pred = mx.argmax(model.head(x[:, :1]), axis=-1)
            if streams:
                conf = _stream_confidence(model.draft_logits(x[:, 1 : 1 + g]), 3,
                                          model.draft_vocab_ids)
                mx.eval(pred, conf)
                np.array(conf)
            else:
                mx.eval(pred)
            np.array(pred)
            dt = time.perf_counter() - t
            cache.commit([[] for _ in range(B)])  # nothing kept
            return dt

        for streams in (False, True):
            one_pass(streams)
            best = min(one_pass(streams) for _ in range(repeat))
            out["streams" if streams else "plain"][str(B)] = best
    return out


def batch_cost_curve(batch_cost: dict[str, dict[str, float]]) -> list[float]:
    """Cost of a batched pass with stream rows over one without, for B = 1 .. the
    largest measured batch (linear between the measured sizes)."""
    sizes = sorted(int(b) for b in batch_cost["plain"])
    ratios = [batch_cost["streams"][str(b)] / batch_cost["plain"][str(b)] for b in sizes]
    return [round(float(np.interp(b, sizes, ratios)), 3) for b in range(1, sizes[-1] + 1)]


def acceptance_stats(
    model: SpecStreamModel,
    prompts: list[list[int]],
    max_tokens: int = 96,
    kmax: int = 8,
    progress: bool = True,
) -> dict[str, object]:
    """Probability of every rank path (ranks < kmax) being entirely right."""
    from .decode import DecodeStats, autoregressive_steps

    g = model.cfg.num_streams
    counts: Counter[tuple[int, ...]] = Counter()
    hosts = 0
    for ids in tqdm(prompts, desc="acceptance", disable=not progress, unit="prompt"):
        out = list(autoregressive_steps(model, mx.array(ids), max_tokens, DecodeStats()))
        seq = list(ids) + out
        first = len(ids) - 1  # host positions whose continuation is generated text
        last = len(seq) - 2
        if last < first:
            continue
        tokens = mx.array(seq)[None]
        positions = mx.arange(len(seq))
        h = model.lower(tokens, positions)
        rows = mx.arange(first, last + 1)
        _, sh = model.upper(h, positions, stream_rows=rows)
        logits = model.draft_logits(sh[0])  # (H, g, V), -inf outside a draft vocabulary
        H = last - first + 1
        # target of stream j at host t: seq[t + 2 + j]  (j = 0..g-1)
        tgt_idx = np.arange(first, last + 1)[:, None] + 2 + np.arange(g)[None, :]
        valid = tgt_idx < len(seq)
        seq_np = np.array(seq, dtype=np.int32)
        tgt = mx.array(np.where(valid, seq_np[np.minimum(tgt_idx, len(seq) - 1)], 0))
        tgt_logit = mx.take_along_axis(logits, tgt[..., None], axis=-1)
        ranks = np.array(mx.sum(logits > tgt_logit, axis=-1))  # (H, g)
        for i in range(H):
            path: tuple[int, ...] = ()
            for j in range(g):
                if not valid[i, j] or ranks[i, j] >= kmax:
                    break
                path = path + (int(ranks[i, j]),)
                counts[path] += 1
        hosts += H
    probs = {",".join(map(str, p)): c / max(hosts, 1) for p, c in counts.items()}
    return {"hosts": hosts, "path_prob": probs, "kmax": kmax}


def _parse(p: str) -> tuple[int, ...]:
    return tuple(int(x) for x in p.split(",")) if p else ()


def choose_tree(cost: dict[str, object], accept: dict[str, object]) -> dict[str, object]:
    """Expected tokens/pass and tokens/s of the best tree of each measured size."""
    probs = {_parse(k): v for k, v in accept["path_prob"].items()}
    ar = float(cost["autoregressive"])
    measured = sorted((int(n), float(t)) for n, t in cost["tree"].items())
    # a pass with more nodes does no less work: a size measured slower than a larger one
    # was measured in noise and gets the larger one's time
    for i in range(len(measured) - 2, -1, -1):
        measured[i] = (measured[i][0], min(measured[i][1], measured[i + 1][1]))
    table = []
    for n, seconds in measured:
        paths = best_paths(probs, n)
        exp_tokens = 1.0 + sum(probs[p] for p in paths)
        table.append({
            "size": n, "nodes": len(paths) + 1, "seconds": seconds,
            "tokens_per_pass": exp_tokens, "tokens_per_s": exp_tokens / seconds,
            "speedup": exp_tokens / seconds * ar,
        })
    best = max(table, key=lambda r: r["tokens_per_s"])
    paths = best_paths(probs, best["nodes"])
    return {"table": table, "best": best, "tree_paths": [list(p) for p in paths]}


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["choice"]["table"]
    n = [r["nodes"] for r in table]
    ar = result["cost"]["autoregressive"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].plot(n, [r["seconds"] * 1e3 for r in table], "o-", label="tree pass (with streams)")
    ax[0].axhline(ar * 1e3, color="gray", ls="--", label="1-token pass, no streams")
    ax[0].set_xlabel("tree nodes")
    ax[0].set_ylabel("ms per forward pass")
    ax[0].legend()
    ax[1].plot(n, [r["speedup"] for r in table], "o-", color="tab:green")
    ax[1].axhline(1.0, color="gray", ls="--")
    ax[1].set_xlabel("tree nodes")
    ax[1].set_ylabel("expected speed-up over autoregressive")
    best = result["choice"]["best"]
    ax[1].plot([best["nodes"]], [best["speedup"]], "r*", ms=12)
    fig.suptitle(result.get("machine", ""), fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110))


def machine_id() -> str:
    return f"{platform.system()}-{platform.machine()}-{os.cpu_count()}cpu-{mx.default_device()}"


def calibrate_folder(
    folder: str | Path,
    prompts: list[str] | list[list[dict[str, str]]] | None = None,
    num_prompts: int = 16,
    max_tokens: int = 96,
    write: bool = True,
    progress: bool = True,
    streams_path: str | Path | None = None,
) -> dict[str, object]:
    """Measure, choose and (when ``write``) store the tree of a model folder (or of the
    streams folder ``streams_path`` used with it).  ``prompts``: user turns (or
    conversations ending in one) of the domain the streams were trained for, never the
    evaluation set (default: the last held-out chitchat turns, never trained on and
    disjoint from the first ones the benchmarks use)."""
    from .generate import load
    from .training.data import chitchat_prompts

    if streams_path is not None and not Path(streams_path).is_dir():
        raise FileNotFoundError(f"streams folder not found: {streams_path}")
    model, tokenizer = load(folder, streams_path=streams_path)
    folder = Path(streams_path) if streams_path is not None else Path(folder)
    if prompts is None:
        heldout = chitchat_prompts()[1]
        if not 0 < num_prompts <= len(heldout):
            raise ValueError(f"num_prompts must be 1..{len(heldout)} (held-out chitchat turns), "
                             f"got {num_prompts}; pass your own prompts for more")
        prompts = heldout[-num_prompts:]
    convs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in convs]
    cost = measure_cost(model, progress=progress)
    batch_cost = measure_batch_cost(model, progress=progress)
    accept = acceptance_stats(model, ids, max_tokens, progress=progress)
    choice = choose_tree(cost, accept)
    result = {"machine": machine_id(), "cost": cost, "batch_cost": batch_cost,
              "acceptance": accept, "choice": choice}
    if write:
        _write_json(folder / CALIBRATION_FILE, result)
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        apply_result(config.setdefault(CONFIG_KEY, model.cfg.to_dict()), result)
        _write_json(config_path, config)
        plot(result, folder / "calibration.png")
    return result


def apply_result(section: dict, result: dict) -> None:
    """Store a calibration result in a config section: the chosen tree, its cost ratio
    (for the adaptive pause) and ``tree_costs``: the cost of a pass of n nodes over a
    plain pass for every n up to the largest measured (linear between measured sizes),
    read by dynamic chains and by the batch's tree size (``batching.batch_tree_size``:
    a pass of B sequences with L nodes each costs what a pass of B * L nodes costs) and,
    when measured, ``batch_stream_costs`` (the batch's decision to run the streams)."""
    cost, choice = result["cost"], result["choice"]
    section["tree_paths"] = choice["tree_paths"]
    section["draft_cost_ratio"] = round(choice["best"]["seconds"] / cost["autoregressive"], 3)
    section["tree_costs"] = cost_curve(cost)
    if "batch_cost" in result:
        section["batch_stream_costs"] = batch_cost_curve(result["batch_cost"])


def cost_curve(cost: dict) -> list[float]:
    """Measured pass costs over the plain pass for n = 1, 2, ... up to the largest
    measured size, interpolated linearly between the measured sizes."""
    sizes = sorted(int(n) for n in cost["tree"])
    ratios = [cost["tree"][str(n)] / cost["autoregressive"] for n in sizes]
    return [round(float(np.interp(n, sizes, ratios)), 3) for n in range(1, sizes[-1] + 1)]


def _write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--streams-path", default=None,
                   help="a streams folder used with the model (its config gets the tree)")
    p.add_argument("--num-prompts", type=int, default=16,
                   help="prompts to measure acceptance on (default 16)")
    p.add_argument("--prompts", default=None,
                   help="a .txt (one prompt a line) or .jsonl file of prompts from the domain "
                        "the streams serve (e.g. distill's valid.jsonl; never the evaluation "
                        "set); the first --num-prompts are used (default: held-out chitchat)")
    p.add_argument("--max-tokens", type=int, default=96,
                   help="tokens generated per prompt (default 96)")
    p.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")


def run(args: argparse.Namespace) -> int:
    from .models import resolve_model

    folder = resolve_model(args.model)
    prompts = None
    if args.prompts:
        from .training.distill import read_prompts

        prompts = read_prompts(args.prompts)[: args.num_prompts]
        if not prompts:
            raise ValueError(f"{args.prompts}: no prompts")
    r = calibrate_folder(folder, prompts=prompts, num_prompts=args.num_prompts,
                         max_tokens=args.max_tokens, write=not args.dry_run,
                         streams_path=args.streams_path)
    ar = r["cost"]["autoregressive"]
    print(f"machine: {r['machine']}; 1-token pass {ar * 1e3:.1f} ms; "
          f"{r['acceptance']['hosts']} scored positions")
    print(f"{'size':>4} | {'nodes':>5} | {'ms/pass':>8} | {'x 1-token':>9} | {'tokens/pass':>11} | "
          f"{'exp. speed-up':>13}")
    for row in r["choice"]["table"]:
        print(f"{row['size']:>4} | {row['nodes']:>5} | {row['seconds'] * 1e3:>8.1f} | "
              f"{row['seconds'] / ar:>9.2f} | "
              f"{row['tokens_per_pass']:>11.2f} | {row['speedup']:>13.2f}")
    best = r["choice"]["best"]
    bc = r["batch_cost"]
    print("batched pass with streams / without, by sequences: " + ", ".join(
        f"{b}: {bc['streams'][b] / bc['plain'][b]:.2f}" for b in sorted(bc["plain"], key=int)))
    print(f"chosen: {best['nodes']} nodes, paths {r['choice']['tree_paths']}")
    if not args.dry_run:
        where = Path(args.streams_path or folder)
        print(f"wrote tree_paths to {where / 'config.json'} and calibration.png")
    return 0
