"""What the benchmarks share: the model pair and the held-out chat prompts."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream import load, stream_generate
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


@dataclass
class Run:
    tokens: list[int]
    seconds: float  # from the first generated token to the last (decode time)
    passes: int  # forward passes after the prefill
    step_tokens: int = 0  # tokens those passes produced (EOS included)


def run_mlx_lm(model, tokenizer) -> Callable[[list[int], int], Run]:
    """mlx-lm's stream_generate, greedy: what a user of mlx-lm runs (detokenizing too)."""
    from mlx_lm.generate import stream_generate as mlx_stream

    eos = set(tokenizer.eos_token_ids)

    def go(ids: list[int], n: int) -> Run:
        toks: list[int] = []
        t0 = None
        for r in mlx_stream(model, tokenizer, ids, max_tokens=n):
            if t0 is None:
                t0 = time.perf_counter()
            if r.token in eos:
                break
            toks.append(r.token)
        passes = max(len(toks) - 1, 0)
        return Run(toks, time.perf_counter() - t0, passes, passes)

    return go


def run_ours(model, tokenizer, **opts) -> Callable[[list[int], int], Run]:
    def go(ids: list[int], n: int) -> Run:
        toks: list[int] = []
        t0 = None
        last = None
        for r in stream_generate(model, tokenizer, ids, n, **opts):
            if t0 is None:
                t0 = time.perf_counter()
            last = r
            if r.token not in tokenizer.eos_token_ids:
                toks.append(r.token)
        passes = last.forward_passes if last else 0
        step_tokens = round(last.tokens_per_pass * passes) if last else 0
        return Run(toks, time.perf_counter() - t0, passes, step_tokens)

    return go
