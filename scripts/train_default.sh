#!/usr/bin/env bash
# Reproduces mlx_specstream/default_streams/ (the trained streams of the default model,
# SmolLM2-135M-Instruct) from scratch, on a CPU:
#   1. self-distillation: the base model's own greedy answers (<= 128 tokens) to the first
#      user turns of chitchat-dataset conversations (the last 100 conversations are held out);
#   2. lossless training of the streams (base frozen): stream embeddings, stream-only LoRA
#      (rank 32) in the top 4 MSA layers, then the pruning adapter;
#   3. tokens per forward pass on 30 held-out prompts x 128 tokens.
# Usage: scripts/train_default.sh [WORK_DIR]   (default runs/default; resumable: distill
# appends and skips prompts already answered).  Environment: PYTHON, NUM_PROMPTS, EPOCHS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${1:-runs/default}
NUM_PROMPTS=${NUM_PROMPTS:-800}
EPOCHS=${EPOCHS:-3}
mkdir -p "$WORK"
MODEL=$("$PY" -c "import mlx_specstream
from mlx_specstream.default_model import default_model_path
print(default_model_path(verbose=False))")

"$PY" -m mlx_specstream.cli distill --model "$MODEL" --output "$WORK/data" \
    --num-prompts "$NUM_PROMPTS" --max-tokens 128 --batch-size 32

"$PY" -m mlx_specstream.cli train --model "$MODEL" --data "$WORK/data" \
    --adapter-path "$WORK/streams" --reinit --mode lossless \
    --num-streams 3 --stream-layers 4 --stream-lora-rank 32 --tree-topk 3 2 1 \
    --epochs "$EPOCHS" --batch-tokens 2048 --lr 5e-4 --embed-lr 5e-3 \
    --exit-phase after --exit-iters 30 \
    --checkpoint-every 20 --checkpoint-dir "$WORK/checkpoints" \
    --report "$WORK/train_report.json"

mkdir -p mlx_specstream/default_streams
cp "$WORK/streams/config.json" "$WORK/streams/specstream.safetensors" \
    mlx_specstream/default_streams/

"$PY" - "$MODEL" "$WORK/streams" <<'PYEOF'
import sys
import mlx_specstream
from mlx_specstream import load, stream_generate
from mlx_specstream.training.data import heldout_prompts

model, tok = load(sys.argv[1], streams_path=sys.argv[2])
tokens = passes = 0
depth = [0] * model.cfg.num_streams
for p in heldout_prompts(30):
    prompt = tok.apply_chat_template([{"role": "user", "content": p}],
                                     add_generation_prompt=True, tokenize=False)
    last = None
    for last in stream_generate(model, tok, prompt, max_tokens=128):
        pass
    tokens += round(last.tokens_per_pass * last.forward_passes)
    passes += last.forward_passes
    for d, a in enumerate(last.accepted_per_depth[: len(depth)]):
        depth[d] += a
print(f"held-out: {tokens / max(passes, 1):.3f} tokens per forward pass "
      f"({tokens} tokens, {passes} passes); acceptance per depth: "
      + " ".join(f"{a / max(passes, 1):.3f}" for a in depth))
PYEOF
