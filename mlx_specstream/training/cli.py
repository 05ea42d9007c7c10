"""Train the speculative streams of a model folder.

lossless mode: the base model is frozen; the stream embeddings, the stream-only LoRA
of the MSA layers and the pruning adapter learn (greedy output stays bit-identical).
task mode: LoRA on the whole model plus the streams, trained jointly (merge it with
``mlx-specstream fuse``).

Data: DIR/train.jsonl and DIR/valid.jsonl, each line {"text"}, {"prompt","completion"}
or {"messages"} as mlx-lm reads them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import SpecStreamConfig
from ..files import atomic_write_text
from ..tree import add_tree_topk_argument
from .data import load_jsonl, load_split, make_batches
from .trainer import TrainConfig, prepare_model, save_streams, save_task_adapters, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--data", required=True, help="folder with train.jsonl and valid.jsonl")
    p.add_argument("--mode", choices=["lossless", "task"], default="lossless",
                   help="lossless (default): train the streams only, the output stays the "
                        "model's; task: LoRA on the whole model too (needs --adapter-path, "
                        "then fuse)")
    p.add_argument(
        "--adapter-path",
        default=None,
        help="save into this folder instead of the model folder (required in task mode)",
    )
    p.add_argument("--streams-path", default=None, help="start from the streams in this folder")
    p.add_argument("--reinit", action="store_true", help="start from fresh streams")
    p.add_argument(
        "--no-streams",
        action="store_true",
        help="task mode: train the LoRA alone (plain fine-tuning; decodes plainly)",
    )
    g = p.add_argument_group("streams")
    g.add_argument("--num-streams", type=int, default=None,
                   help="streams per token, i.e. draft depth (default: the folder's)")
    g.add_argument("--stream-layers", type=int, default=None,
                   help="top layers that carry the streams (default: the folder's; more "
                        "than the folder's keeps its trained streams, the added layers "
                        "starting from a zero LoRA delta)")
    g.add_argument(
        "--draft-method",
        choices=["streams", "medusa"],
        default=None,
        help="speculative streams (the method) or medusa heads (the baseline)",
    )
    g.add_argument(
        "--stream-lora-rank",
        type=int,
        default=None,
        help="stream-only LoRA rank of the MSA layers (default 32; medusa: 0)",
    )
    g.add_argument("--stream-lora-scale", type=float, default=None,
                   help="scale of that LoRA (default: the folder's)")
    g.add_argument("--adapter-rank", type=int, default=None,
                   help="rank of the pruning adapter (default: the folder's)")
    add_tree_topk_argument(g)
    g.add_argument("--prune-threshold", type=float, default=None,
                   help="tree pruning threshold stored with the streams, 0 disables")
    t = p.add_argument_group("optimisation")
    t.add_argument("--iters", type=int, default=None, help="optimizer steps (default: --epochs)")
    t.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    t.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (default 1)")
    t.add_argument(
        "--batch-tokens",
        type=int,
        default=2048,
        help="tokens (batch x length, padding included) per micro-batch",
    )
    t.add_argument("--max-seq-len", type=int, default=512,
                   help="records are cut to this many tokens (default 512)")
    t.add_argument("--lr", type=float, default=5e-4, help="learning rate (default 5e-4)")
    t.add_argument(
        "--embed-lr",
        type=float,
        default=None,
        help="lr of the stream embeddings (or of the medusa heads)",
    )
    t.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (default 1)")
    t.add_argument("--alpha0", type=float, default=1.0,
                   help="weight of the next-token loss in task mode (default 1)")
    t.add_argument(
        "--alphas",
        type=float,
        nargs="+",
        default=None,
        help="per-stream loss weights (default 0.1 each)",
    )
    t.add_argument(
        "--exit-phase",
        choices=["joint", "after", "none"],
        default="joint",
        help="train the pruning adapter with the streams, after them, or not",
    )
    t.add_argument("--exit-iters", type=int, default=0,
                   help="steps of --exit-phase after (default: as many as the streams')")
    t.add_argument("--lora-rank", type=int, default=32, help="task-mode LoRA rank")
    t.add_argument("--lora-scale", type=float, default=2.0, help="task-mode LoRA scale")
    t.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batch order")
    t.add_argument(
        "--no-mask-prompt",
        action="store_true",
        help="also train on prompt tokens of chat / completion records",
    )
    t.add_argument("--max-train", type=int, default=None, help="use the first N records")
    t.add_argument("--max-valid", type=int, default=None, help="validate on the first N records")
    t.add_argument(
        "--cache-gb",
        type=float,
        default=1.0,
        help="GB of memory for the frozen base's features, kept across epochs in lossless "
        "mode so later epochs skip the base's forward (default 1; batches beyond it are "
        "recomputed each epoch; 0 keeps none; raise it when memory allows)",
    )
    c = p.add_argument_group("checkpoints")
    c.add_argument("--checkpoint-every", type=int, default=0,
                   help="save a checkpoint every N steps (default: never)")
    c.add_argument(
        "--checkpoint-dir",
        default=None,
        help="default: <save folder>/checkpoints when --checkpoint-every is set",
    )
    c.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    c.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop after this step (checkpointed; continue with --resume)",
    )
    p.add_argument("--eval-every", type=int, default=0,
                   help="validate every N steps (a learning curve in the report)")
    p.add_argument("--report", default=None, help="write a JSON report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _spec(args: argparse.Namespace, base_cfg: SpecStreamConfig) -> SpecStreamConfig:
    d = base_cfg.to_dict()
    if args.draft_method is not None:
        d["draft_method"] = args.draft_method
    if args.stream_lora_rank is None:
        args.stream_lora_rank = 0 if d["draft_method"] == "medusa" else 32
    for key in (
        "num_streams",
        "stream_layers",
        "adapter_rank",
        "stream_lora_rank",
        "stream_lora_scale",
        "prune_threshold",
    ):
        v = getattr(args, key)
        if v is not None:
            d[key] = v
    # New streams: the product tree of tree_topk until `mlx-specstream calibrate` sizes
    # the tree for this machine (a tree calibrated for the old streams no longer fits).
    d["tree_paths"] = None
    if args.tree_topk is not None:
        d["tree_topk"] = args.tree_topk
    elif len(d["tree_topk"]) > d["num_streams"]:
        d["tree_topk"] = d["tree_topk"][: d["num_streams"]]
    return SpecStreamConfig.from_dict(d)


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from ..generate import load

    if args.mode == "task" and not args.adapter_path:
        raise ValueError("task mode changes the model: give --adapter-path (then `fuse`)")
    from ..models import resolve_model

    model_path = resolve_model(args.model)
    save_dir = Path(args.adapter_path) if args.adapter_path else Path(model_path)
    ckpt = args.checkpoint_dir
    if ckpt is None and (args.checkpoint_every or args.resume):
        ckpt = str(save_dir / "checkpoints")

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = load(model_path, streams_path=args.streams_path)
    spec = _spec(args, model.cfg)
    if args.no_streams:
        spec.tree_paths = []  # untrained streams: decode plainly
    model = prepare_model(model, spec, reinit=args.reinit, seed=args.seed)

    tc = TrainConfig(
        mode=args.mode,
        streams=not args.no_streams,
        iters=args.iters,
        epochs=args.epochs,
        grad_accum=args.grad_accum,
        lr=args.lr,
        embed_lr=args.embed_lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        alpha0=args.alpha0,
        alphas=args.alphas,
        exit_phase=args.exit_phase,
        exit_iters=args.exit_iters,
        lora_rank=args.lora_rank,
        lora_scale=args.lora_scale,
        seed=args.seed,
        cache_gb=args.cache_gb,
        checkpoint_every=args.checkpoint_every,
        checkpoint_dir=ckpt,
        resume=args.resume,
        stop_at=args.stop_at,
        eval_every=args.eval_every,
    )
    def split(name: str, limit: int | None) -> list:
        return load_split(args.data, name, tok, mask_prompt=not args.no_mask_prompt,
                          max_seq_len=args.max_seq_len, limit=limit)

    train_ex = split("train", args.max_train)
    # A small distill run can leave valid.jsonl empty (it holds every 20th answer):
    # train then runs without validation, as without the file.
    valid_path = Path(args.data) / "valid.jsonl"
    valid_ex = []
    if valid_path.is_file() and load_jsonl(valid_path):
        valid_ex = split("valid", args.max_valid)
    else:
        print(f"no records in {valid_path}: training without validation")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    train_b = make_batches(train_ex, args.batch_tokens, pad)
    valid_b = make_batches(valid_ex, args.batch_tokens, pad) if valid_ex else []
    ntok = sum(int(b.targets.sum()) for b in train_b)
    print(
        f"model {model_path}: {len(model.layers)} layers, hidden {model.args.hidden_size}; "
        f"streams {spec.num_streams}, MSA layers {spec.stream_layers}, "
        f"stream LoRA rank {spec.stream_lora_rank}"
    )
    print(
        f"data: {len(train_ex)} train records ({ntok} target tokens, {len(train_b)} "
        f"micro-batches), {len(valid_ex)} valid records"
    )

    probe = None
    if args.mode == "lossless" and valid_b:
        probe = mx.array(valid_b[0].tokens[:1])
        ref = model(probe, with_streams=False)[0]
        mx.eval(ref)

    report = train(model, train_b, valid_b, tc, progress=not args.no_progress)

    if probe is not None:
        same = bool(mx.array_equal(model(probe, with_streams=False)[0], ref).item())
        print(f"lossless check: main-stream logits bit-identical to the base model: {same}")
        report["lossless_check"] = same
        if not same:
            raise RuntimeError("main-stream logits changed in lossless mode")

    if args.mode == "task":
        save_task_adapters(model, save_dir, tc, model_path)
    else:
        save_streams(model, save_dir)
    extra = sum(v.size for v in model.stream_parameters().values())
    print(
        f"saved to {save_dir} ({extra} stream parameters, "
        f"{extra * 4 / 2**20:.2f} MiB fp32); training took {report['seconds']:.0f}s"
    )
    if args.report:
        atomic_write_text(args.report, json.dumps(report, indent=2, default=float) + "\n")
    return 0
