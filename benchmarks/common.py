"""What the benchmarks share: the model pair and the held-out chat prompts."""

from __future__ import annotations

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream import load
from mlx_specstream.training.data import heldout_prompts

from mlx_lm.utils import load as mlx_lm_load


def load_pair(model: str | None):
    """(our model, tokenizer, folder, mlx-lm's model of the same folder); the default
    model when ``model`` is None."""
    ours, tokenizer = load(model)
    folder = model
    if folder is None:
        from mlx_specstream.default_model import default_model_path

        folder = str(default_model_path())
    ref, _ = mlx_lm_load(folder)
    return ours, tokenizer, folder, ref


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """The first ``n`` held-out chitchat prompts through the chat template."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
        for t in heldout_prompts(n)
    ]
