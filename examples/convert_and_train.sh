#!/usr/bin/env bash
# Convert a Hugging Face checkpoint (or a .gguf file) into a model folder, then train
# its speculative streams on your own data (lossless mode: the base model's output
# is unchanged, only the drafting streams learn).
#
#   bash examples/convert_and_train.sh /path/to/hf-folder-or-file.gguf [work-dir]
#
# Real training wants thousands of records; this writes a tiny jsonl to show the
# formats (see mlx_specstream/training/data.py): {"text"}, {"prompt","completion"},
# {"messages"}.
set -euo pipefail

SRC="${1:?usage: $0 HF_FOLDER_OR_GGUF [WORK_DIR]}"
WORK="${2:-specstream_work}"
MODEL="$WORK/model"
DATA="$WORK/data"
mkdir -p "$DATA"

# 1. Convert (adds the speculative-streaming config and fresh streams).
mlx-specstream convert "$SRC" --mlx-path "$MODEL" --force

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
mlx-specstream train --model "$MODEL" --data "$DATA" --mode lossless --iters 20

# 4. Try it: tokens per forward pass > 1 means the streams draft usefully.
mlx-specstream generate --model "$MODEL" --prompt "What is the capital of France?" --max-tokens 32
