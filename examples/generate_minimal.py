"""The shortest generation: load the default model (or the folder given) and generate."""

import sys

from mlx_specstream import generate, load

model, tokenizer = load(sys.argv[1] if len(sys.argv) > 1 else None)
text = generate(model, tokenizer, "Write a haiku about the sea.", max_tokens=64, verbose=True)
