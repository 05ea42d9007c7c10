#!/usr/bin/env bash
# Reproduces mlx_specstream/default_streams/ (the trained streams of the default model,
# SmolLM2-135M-Instruct) from scratch:
#   1. self-distillation: the base model's own greedy answers (<= 128 tokens) to the first
#      user turns of chitchat-dataset conversations (the last 100 conversations are held out);
#   2. lossless training of the streams (base frozen): stream embeddings, stream-only LoRA
#      (rank 32) in the top 4 MSA layers, then the pruning adapter;
#   3. more distilled answers (all the training-side prompts) and two short continuations
#      of the streams on the whole set (the pruning adapter is kept): CONT_ITERS steps, then
#      CONT2_ITERS more with a fresh schedule and another batch order (seed 1);
#   4. tokens per forward pass on 30 held-out prompts x 128 tokens (benchmarks/bench_heldout.py);
#   5. broad data: user requests written by the model itself (self-instruct) and follow-up
#      turns, later chitchat turns with their history, chatterbot-corpus questions, tasks
#      over standard-library passages and the SQL questions, answered by the model (a few
#      also sampled at temperature 0.7); the streams continue on it (BROAD_ITERS steps),
#      then once more on everything answered by then (BROAD2_ITERS steps, another batch
#      order), validated every 10 steps (the learning curve, benchmarks/plot_learning_curve.py);
#   6. the draft vocabulary (the 8,192 tokens most frequent in the broad answers) and a
#      third continuation whose stream loss is over those rows only: a schedule of
#      BROAD3_ITERS steps stopped at BROAD3_STOP (checkpointed; --resume continues it);
#   7. the draft corpus (the broad answers) for the context branch;
#   8. the tree calibrated for the machine it runs on, written to the shipped config.
# Usage: scripts/train_default.sh [WORK_DIR]   (default runs/default; resumable: distill
# appends and skips prompts already answered).  Environment: PYTHON, NUM_PROMPTS, EPOCHS,
# ALL_PROMPTS, CONT_ITERS, CONT2_ITERS, SELF_INSTRUCT, FOLLOW_UPS, PER_SOURCE, BROAD_ITERS,
# BROAD2_ITERS, BROAD3_ITERS, BROAD3_STOP;
# START_STREAMS=DIR starts step 5 from the streams in DIR instead of running steps 1-4.
# The shipped run: steps 1-2 with 3000 prompts, batch 128, 48 epochs of 8192-token batches,
# lr 1e-3, P lr 5e-3, pruning adapter 200 steps after the streams, on a lent H200 (MLX CUDA,
# same commands; ~4 min of distillation + ~3 min of training).  Step 3 ran on this
# project's 2-core CPU: 1,784 more answers (~25 min at batch 48), then 64 + 96 steps of
# 4096-token batches at lr 3e-4 (~39 s a step; default_streams/train_report_cont*.json).  On a
# 2-core CPU steps 1-2 take hours (NUM_PROMPTS=1000 EPOCHS=3 is a CPU-sized first stage).
# Step 5 ran on the same CPU from the step-4 streams: 1,400 requests written by the model
# (28 min), then its distillation was stopped after 37 min with 1,360 answers (697 to the
# model's own requests, 287 chitchat first turns and chatterbot questions, 129 passage
# tasks, 125 SQL questions, 122 later chitchat turns with history; no follow-ups and no
# sampled answers were reached), then 30 steps (about half an epoch, ~47 s a step; lr 1e-3
# made validation worse). The distillation then resumed for 46 min (1,805 answers in all,
# follow-ups started) and the streams continued 40 steps on them (54 min with validation,
# machine shared): validation tokens/pass [3,2,1] 1.673 -> 1.709, chain 1.406 -> 1.421.
# Step 6 ran on the same CPU, alone: 160 of 240 planned steps (about two epochs; 25 s a step
# in the first epoch, 11 s in the second with the frozen features in RAM; 62 min with eight
# validations): validation tokens/pass [3,2,1] 1.707 -> 1.772, chain 1.423 -> 1.481.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${1:-runs/default}
NUM_PROMPTS=${NUM_PROMPTS:-3000}
BATCH=${BATCH:-128}
EPOCHS=${EPOCHS:-48}
ALL_PROMPTS=${ALL_PROMPTS:-4784}
CONT_ITERS=${CONT_ITERS:-64}
CONT2_ITERS=${CONT2_ITERS:-96}
SELF_INSTRUCT=${SELF_INSTRUCT:-1400}
FOLLOW_UPS=${FOLLOW_UPS:-400}
PER_SOURCE=${PER_SOURCE:-200}
BROAD_ITERS=${BROAD_ITERS:-30}
BROAD2_ITERS=${BROAD2_ITERS:-40}
BROAD3_ITERS=${BROAD3_ITERS:-240}
BROAD3_STOP=${BROAD3_STOP:-160}
START_STREAMS=${START_STREAMS:-}
mkdir -p "$WORK"
MODEL=$("$PY" -c "import mlx_specstream
from mlx_specstream.default_model import default_model_path
print(default_model_path(verbose=False))")

# Steps 1-4: the chat stage.
if [ -z "$START_STREAMS" ]; then
    "$PY" -m mlx_specstream.cli distill --model "$MODEL" --output "$WORK/data" \
        --num-prompts "$NUM_PROMPTS" --max-tokens 128 --batch-size "$BATCH"

    "$PY" -m mlx_specstream.cli train --model "$MODEL" --data "$WORK/data" \
        --adapter-path "$WORK/streams" --reinit --mode lossless \
        --num-streams 3 --stream-layers 4 --stream-lora-rank 32 --tree-topk 3 2 1 \
        --epochs "$EPOCHS" --batch-tokens 8192 --lr 1e-3 --embed-lr 5e-3 \
        --exit-phase after --exit-iters 200 \
        --checkpoint-every 20 --checkpoint-dir "$WORK/checkpoints" \
        --report "$WORK/train_report.json"

    "$PY" -m mlx_specstream.cli distill --model "$MODEL" --output "$WORK/data" \
        --num-prompts "$ALL_PROMPTS" --max-tokens 128 --batch-size 48

    # continue_streams FROM TO ITERS SEED: a continuation of the streams in FROM (pruning adapter kept)
    continue_streams() {
        "$PY" -m mlx_specstream.cli train --model "$MODEL" --data "$WORK/data" \
            --streams-path "$WORK/$1" --adapter-path "$WORK/$2" --mode lossless \
            --iters "$3" --batch-tokens 4096 --lr 3e-4 --embed-lr 1.5e-3 --warmup 0.1 \
            --seed "$4" --exit-phase none --cache-gb 0 \
            --checkpoint-every 16 --checkpoint-dir "$WORK/checkpoints_${2#streams_}" \
            --report "$WORK/train_report_${2#streams_}.json"
    }
    continue_streams streams streams_cont "$CONT_ITERS" 0
    continue_streams streams_cont streams_cont2 "$CONT2_ITERS" 1
    START_STREAMS="$WORK/streams_cont2"
fi

# Step 5: broad data and the continuation on it.
"$PY" benchmarks/sql_data.py --output "$WORK/sql" --train 3000 >/dev/null
"$PY" -m mlx_specstream.cli distill --model "$MODEL" --output "$WORK/broad" \
    --self-instruct "$SELF_INSTRUCT" --follow-ups "$FOLLOW_UPS" \
    --sources chitchat,chitchat-turns,chatterbot,passages --num-prompts "$PER_SOURCE" \
    --prompts "$WORK/sql/train.jsonl" --sampled-fraction 0.08 --temp 0.7 --batch-size 64
"$PY" -m mlx_specstream.cli train --model "$MODEL" --data "$WORK/broad" \
    --streams-path "$START_STREAMS" --adapter-path "$WORK/streams_broad" --mode lossless \
    --iters "$BROAD_ITERS" --batch-tokens 4096 --lr 3e-4 --embed-lr 1.5e-3 --warmup 0.1 \
    --seed 2 --exit-phase none --cache-gb 0 --eval-every 10 --max-valid 60 \
    --checkpoint-every 10 --checkpoint-dir "$WORK/checkpoints_broad" \
    --report "$WORK/train_report_broad.json"
"$PY" -m mlx_specstream.cli train --model "$MODEL" --data "$WORK/broad" \
    --streams-path "$WORK/streams_broad" --adapter-path "$WORK/streams_broad2" --mode lossless \
    --iters "$BROAD2_ITERS" --batch-tokens 4096 --lr 3e-4 --embed-lr 1.5e-3 --warmup 0.1 \
    --seed 3 --exit-phase none --cache-gb 3 --eval-every 10 --max-valid 60 \
    --checkpoint-every 10 --checkpoint-dir "$WORK/checkpoints_broad2" \
    --report "$WORK/train_report_broad2.json"

# Step 6: the draft vocabulary (the 8,192 tokens most frequent in the broad answers, 99.0%
# of them) in a working folder (the model's files linked, its own config), and a third
# continuation whose stream loss is over those rows only (the LM head's share of a step
# falls by 6x).
mkdir -p "$WORK/model"
for f in "$MODEL"/*; do
    case "$(basename "$f")" in
        config.json | specstream.safetensors) ;;
        *) ln -sf "$(realpath "$f")" "$WORK/model/" ;;
    esac
done
cp "$WORK/streams_broad2/specstream.safetensors" "$WORK/model/"
MODEL="$MODEL" WORK="$WORK" "$PY" - <<'PYEOF'
import json, os
cfg = json.load(open(os.path.join(os.environ["MODEL"], "config.json")))
section = json.load(open(os.path.join(os.environ["WORK"], "streams_broad2", "config.json")))
cfg["speculative_streaming"] = section["speculative_streaming"]
json.dump(cfg, open(os.path.join(os.environ["WORK"], "model", "config.json"), "w"), indent=2)
PYEOF
"$PY" -m mlx_specstream.cli vocab --model "$WORK/model" --data "$WORK/broad/train.jsonl" \
    --size 8192
"$PY" -m mlx_specstream.cli train --model "$WORK/model" --data "$WORK/broad" \
    --adapter-path "$WORK/streams_broad3" --mode lossless \
    --iters "$BROAD3_ITERS" --stop-at "$BROAD3_STOP" --batch-tokens 4096 --lr 3e-4 \
    --embed-lr 1.5e-3 --warmup 0.05 \
    --seed 4 --exit-phase none --cache-gb 4 --eval-every 20 --max-valid 60 \
    --checkpoint-every 10 --checkpoint-dir "$WORK/checkpoints_broad3" --resume \
    --report "$WORK/train_report_broad3.json"
"$PY" benchmarks/plot_learning_curve.py "$WORK/train_report_broad.json" \
    "$WORK/train_report_broad2.json" "$WORK/train_report_broad3.json"

mkdir -p mlx_specstream/default_streams
cp "$WORK/streams_broad3/config.json" "$WORK/streams_broad3/specstream.safetensors" \
    "$WORK/model/draft_vocab.safetensors" "$WORK/train_report_broad.json" \
    "$WORK/train_report_broad2.json" "$WORK/train_report_broad3.json" \
    mlx_specstream/default_streams/

# Step 7: the draft corpus: the broad answers (3,348 of them when it was shipped), from which
# the context branch drafts where the context repeats nothing.
"$PY" -m mlx_specstream.cli corpus --model "$WORK/model" --data "$WORK/broad/train.jsonl" \
    --force
cp "$WORK/model/draft_corpus.safetensors" mlx_specstream/default_streams/

# Tokens per forward pass on the broad benchmark suite (benchmarks/suite), adaptive pause
# off: the product tree [3, 2, 1] and the chain, each with and without context drafts.
"$PY" benchmarks/bench_heldout.py --model "$MODEL" --streams-path "$WORK/streams_broad3" \
    --trees 3,2,1 1,1,1 --row "3,2,1 + context" tree_topk=3,2,1 lookup_branches=4 \
    --output "$WORK/heldout.md"

# Size the tree for this machine and ship it with the streams.
WORK="$WORK" "$PY" - <<'PYEOF'
import json
import os
import mlx_specstream
from mlx_specstream.calibrate import apply_result, calibrate_folder
from mlx_specstream.default_model import default_model_path

path = "mlx_specstream/default_streams/config.json"
from mlx_specstream.training.distill import read_prompts

prompts = read_prompts(os.path.join(os.environ["WORK"], "broad", "valid.jsonl"))[:16]
result = calibrate_folder(default_model_path(verbose=False), prompts=prompts, write=False)
cfg = json.load(open(path))
apply_result(cfg["speculative_streaming"], result)
# context branches up to 4 tokens; a full one runs its pass without the stream rows (chosen
# by tokens/s on validation prompts: 1.03x)
cfg["speculative_streaming"].update(lookup_branches=4, lookup_skip_streams=4)
json.dump(cfg, open(path, "w"), indent=2)
print("calibrated tree:", result["choice"]["tree_paths"])
PYEOF
