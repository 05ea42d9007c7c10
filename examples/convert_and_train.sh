#!/usr/bin/env bash
# Convert a Hugging Face checkpoint (or a .gguf file) into a model folder, then train
# its speculative streams on your own data (lossless mode: the base model's output
# is unchanged, only the drafting streams learn).
#
#   bash examples/convert_and_train.sh /path/to/hf-folder-or-file.gguf [work-dir]
#   SHORT=1 bash examples/convert_and_train.sh ...   # 2 training steps, 8 tokens: a smoke run
#
# It uses `mlx-specstream` from the active virtual environment, else the one that
# scripts/setup.sh made in this checkout's .venv.
#
# Real training wants thousands of records (`mlx-specstream distill` writes them); this
# writes a tiny jsonl to show the formats (see mlx_specstream/training/data.py):
# {"text"}, {"prompt","completion"}, {"messages"}.  The 20 steps take a few minutes on a
# 2-core CPU with a 135M model.
set -euo pipefail

SRC="${1:?usage: $0 HF_FOLDER_OR_GGUF [WORK_DIR]}"
WORK="${2:-specstream_work}"
MODEL="$WORK/model"
DATA="$WORK/data"
ITERS=20
MAX_TOKENS=32
if [ "${SHORT:-0}" = "1" ]; then
  ITERS=2
  MAX_TOKENS=8
fi

MLX_SPECSTREAM=$(command -v mlx-specstream || true)
if [ -z "$MLX_SPECSTREAM" ]; then
  MLX_SPECSTREAM="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/mlx-specstream"
  if [ ! -x "$MLX_SPECSTREAM" ]; then
    echo "mlx-specstream not found: run 'bash scripts/setup.sh', or activate the" \
         "environment where it is installed" >&2
    exit 1
  fi
fi
mkdir -p "$DATA"

# 1. Convert (adds the speculative-streaming config and fresh streams).
"$MLX_SPECSTREAM" convert "$SRC" -o "$MODEL" --force

# 2. A tiny data set, inline.
cat > "$DATA/train.jsonl" <<'JSONL'
{"text": "The quick brown fox jumps over the lazy dog."}
{"prompt": "What is the capital of France?", "completion": "The capital of France is Paris."}
{"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello! How can I help you today?"}]}
{"prompt": "Write a Python function that adds two numbers.", "completion": "def add(a, b):\n    return a + b"}
JSONL
cat > "$DATA/valid.jsonl" <<'JSONL'
{"prompt": "What is 2 + 2?", "completion": "2 + 2 is 4."}
JSONL

# 3. Train the streams (saved into the model folder).
"$MLX_SPECSTREAM" train --model "$MODEL" --data "$DATA" --mode lossless --iters "$ITERS"

# 4. Try it: tokens per forward pass > 1 means the streams draft usefully.
"$MLX_SPECSTREAM" generate --model "$MODEL" --prompt "What is the capital of France?" \
  --max-tokens "$MAX_TOKENS"
