#!/usr/bin/env bash
# Reproduces mlx_specstream/qwen_coder_streams/ (the trained streams of the built-in
# Qwen/Qwen2.5-Coder-0.5B-Instruct, lossless mode) from scratch:
#   1. training data: user requests written by the model itself (self-instruct, mostly
#      coding), optionally more requests written by another model (REQUESTS=FILE, a
#      requests.jsonl of `distill --self-instruct`, taken by kind: 118 coding, 80
#      explaining, 60 reasoning, 40 lists, 30 writing), 40 tasks over standard-library
#      passages, all answered greedily by the model (<= 160 tokens); plus 300 functions of
#      the Python standard library as plain text (real code);
#   2. the draft vocabulary: the 8,192 tokens most frequent in the standard library's
#      functions and the answers (the streams draft from these, and are trained on them);
#   3. lossless training of fresh streams (base frozen): stream embeddings and a rank-32
#      stream-only LoRA in the top 4 of the 24 layers, 90 steps of 2048-token batches
#      (1.5 epochs; lr 1e-3 with stream-embedding lr 5e-3 diverged after 8 steps);
#   4. the tree calibrated for the machine it runs on, written with the streams;
#   5. the draft corpus (the training data) for the context branch.
# HumanEval (the code benchmark) is never trained on.
# Usage: scripts/train_qwen_coder.sh [WORK_DIR]   (default runs/qwen-coder; distill and
# training resume).  Environment: PYTHON, SELF_INSTRUCT (default 33), REQUESTS, ITERS.
# The shipped run, on this project's 2-core x86-64 CPU (fp32): REQUESTS was the default
# model's requests.jsonl of scripts/train_default.sh step 5; distillation 33 min (401
# answers, 23 tok/s at batch 16), training 90 steps (see
# qwen_coder_streams/train_report.json for its time and validation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${1:-runs/qwen-coder}
SELF_INSTRUCT=${SELF_INSTRUCT:-33}
REQUESTS=${REQUESTS:-}
ITERS=${ITERS:-90}
NAME="Qwen/Qwen2.5-Coder-0.5B-Instruct"
mkdir -p "$WORK"
MODEL=$("$PY" -c "import mlx_specstream
from mlx_specstream.models import resolve_model
print(resolve_model('$NAME'))")

# A working folder: the model's files linked, its own config (the draft vocabulary goes
# there, not into the cached model).
mkdir -p "$WORK/model"
for f in "$MODEL"/*; do
    case "$(basename "$f")" in
        config.json) cp "$f" "$WORK/model/" ;;
        *) ln -sf "$(realpath "$f")" "$WORK/model/" ;;
    esac
done

# Step 1: data.  The prompts file: REQUESTS by kind (if given) with 40 passage tasks
# spread through them.
REQUESTS="$REQUESTS" OUT="$WORK/prompts.jsonl" "$PY" - <<'PYEOF'
import json, os, random
import mlx_specstream
from mlx_specstream.training.sources import source_prompts

out = []
if os.environ["REQUESTS"]:
    rows = [json.loads(x) for x in open(os.environ["REQUESTS"]) if x.strip()]
    rng = random.Random(0)
    for kind, n in {"coding": 118, "explaining": 80, "reasoning": 60, "lists": 40,
                    "writing": 30}.items():
        xs = [r for r in rows if r.get("task") == kind]
        rng.shuffle(xs)
        out += xs[:n]
    rng.shuffle(out)
    out = [r["messages"] for r in out]
passages = source_prompts("passages", 40, seed=7)
step = max(1, len(out) // len(passages))
mixed = []
for i, p in enumerate(passages):
    mixed += out[i * step : (i + 1) * step] + [p]
mixed += out[len(passages) * step :]
with open(os.environ["OUT"], "w") as f:
    f.writelines(json.dumps({"messages": m}) + "\n" for m in mixed)
PYEOF
"$PY" -m mlx_specstream.cli distill --model "$WORK/model" --output "$WORK/data" \
    --self-instruct "$SELF_INSTRUCT" --tasks coding=6,explaining,reasoning,lists,writing \
    --sources none --prompts "$WORK/prompts.jsonl" --num-prompts 1000 --code-texts 300 \
    --batch-size 16 --max-tokens 160 --seed 7

# Step 2: the draft vocabulary.
"$PY" -c "import json, mlx_specstream
from mlx_specstream.training.sources import code_texts
with open('$WORK/stdlib_code.jsonl', 'w') as f:
    f.writelines(json.dumps({'text': c}) + '\n' for _, c in code_texts())"
"$PY" -m mlx_specstream.cli vocab --model "$WORK/model" --data "$WORK/stdlib_code.jsonl" \
    --data "$WORK/data/train.jsonl" --size 8192

# Step 3: the streams.
"$PY" -m mlx_specstream.cli train --model "$WORK/model" --data "$WORK/data" \
    --adapter-path "$WORK/streams" --reinit --mode lossless \
    --num-streams 3 --stream-layers 4 --stream-lora-rank 32 --tree-topk 3 2 1 \
    --iters "$ITERS" --batch-tokens 2048 --max-seq-len 320 --lr 3e-4 --embed-lr 1e-3 \
    --warmup 0.1 \
    --exit-phase none --cache-gb 3 --eval-every 30 \
    --checkpoint-every 10 --checkpoint-dir "$WORK/checkpoints" --resume \
    --report "$WORK/streams/train_report.json"
cp "$WORK/model/draft_vocab.safetensors" "$WORK/streams/"

# Step 4: the tree for this machine, on the training side's validation prompts.
"$PY" -m mlx_specstream.cli calibrate --model "$WORK/model" --streams-path "$WORK/streams" \
    --prompts "$WORK/data/valid.jsonl" --num-prompts 8 --max-tokens 64
# Context branches (prompt lookup) up to 4 tokens; a pass with a full 4-token branch runs
# without the stream rows (chosen by tokens/s on the validation prompts: 1.02x).
"$PY" - "$WORK/streams/config.json" <<'PYEOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["speculative_streaming"].update(lookup_branches=4, lookup_skip_streams=4)
json.dump(cfg, open(sys.argv[1], "w"), indent=2)
PYEOF

# Step 5: the draft corpus (the training data: the answers and the functions), from which
# the context branch drafts where the context repeats nothing.
"$PY" -m mlx_specstream.cli corpus --model "$WORK/model" --data "$WORK/data/train.jsonl" \
    --force

mkdir -p mlx_specstream/qwen_coder_streams
cp "$WORK/streams/config.json" "$WORK/streams/specstream.safetensors" \
    "$WORK/streams/draft_vocab.safetensors" "$WORK/streams/train_report.json" \
    "$WORK/model/draft_corpus.safetensors" mlx_specstream/qwen_coder_streams/
