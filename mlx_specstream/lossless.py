"""Check greedy output against mlx-lm: is every emitted token mlx-lm's own greedy choice?

Where the row-invariant GEMM shim is active (Linux CPU, ``mlx_specstream.backend``) a
token's logits do not depend on how many tokens share its pass, and greedy speculative
output equals mlx-lm's exactly.  Elsewhere (Metal, CUDA, or MLX's CPU kernels without
the shim) matrix kernels are chosen by the number of rows, so a tree node's logits can
round differently from a one-token pass and a near-tie between the two best tokens can
resolve the other way.  The guarantee there is: every emitted token is the argmax of the
model's logits up to a tolerance.  :func:`check_greedy` verifies it.

The reference is mlx-lm itself: ``mlx_lm.generate.generate_step`` runs the plain base
model with its own KV cache, prefilling ``prompt[:-1]`` and then one token per step,
with a sampler that returns our token instead of its choice (teacher forcing).  The
only difference from ``mlx_lm.generate`` is which token is fed back, so at every
position the logits are those mlx-lm computes after our tokens, and its choice is
the argmax of the log-probabilities it would sample from.

Tolerance.  A divergence is measured by its margin, ``z[argmax] - z[token]`` in logit
units (mlx-lm's logits of that position, the model's dtype).  The tolerance is stated in
units of the dtype's rounding step at the top logit, ``ulp = eps * 2**floor(log2|z_max|)``
with ``eps`` the dtype's machine epsilon (bfloat16 2**-7, float16 2**-10, float32
2**-23): a logit of 20 in bfloat16 is stored to the nearest 0.125, so smaller margins
are not representable.  If two kernels change no logit by more than ``d``, a token that
is the argmax of one kernel's logits is within ``2 d`` of the argmax of the other's.
On SmolLM2-135M, 16-row passes changed a logit, against one-row passes, by at most 7.1
ulps in bfloat16 (split-K products, ``row_dependent_rounding``, a CPU stand-in for GPU
kernels) and 40.5 ulps in float32 (OpenBLAS without the shim), over 10 prompts
(benchmarks/results/tolerance_bf16_cpu.md).  The defaults, ``DEFAULT_TOLERANCE_ULPS``,
are twice those bounds rounded up to a power of two: 16 ulps for bfloat16 (2 logits at
|z_max| in [16, 32)) and float16 (not measured: its count taken from bfloat16), 128 ulps
for float32 (2.4e-4 logits there).  Within that margin rounding can explain a
divergence; beyond it, rounding of this size cannot.

The tolerance depends on how much a model amplifies rounding (a tiny random model does
far more than a trained one), so each divergence also carries the row noise measured at
its position (``row_noise``: a multi-row pass of mlx-lm's model against one-row passes
on this device); a margin within twice that noise is explained by rounding there.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

MACHINE_EPSILON: dict[str, float] = {"bfloat16": 2.0**-7, "float16": 2.0**-10, "float32": 2.0**-23}
DEFAULT_TOLERANCE_ULPS: dict[str, float] = {"bfloat16": 16.0, "float16": 16.0, "float32": 128.0}


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def logits_dtype(model: nn.Module) -> str:
    """The dtype the model's logits come out in: that of its embedding (the LM head's
    input; quantized models keep their scales in it)."""
    embed = model.model.embed_tokens
    weight = embed.scales if hasattr(embed, "scales") else embed.weight
    return dtype_name(weight.dtype)


def ulp(top_logit: float, dtype: str) -> float:
    """The dtype's rounding step at the magnitude of ``top_logit``."""
    if dtype not in MACHINE_EPSILON:
        raise ValueError(f"no rounding step for dtype {dtype!r}; known: {sorted(MACHINE_EPSILON)}")
    return MACHINE_EPSILON[dtype] * 2.0 ** math.floor(math.log2(max(abs(top_logit), 1.0)))


@dataclass
class Divergence:
    """An emitted token that is not mlx-lm's greedy choice at its position."""

    position: int  # index among the emitted tokens
    token: int  # ours
    argmax: int  # mlx-lm's choice
    margin: float  # logit of argmax minus logit of token, logit units
    ulps: float  # margin in rounding steps of the dtype at the top logit
    top_logit: float
    row_noise: float | None = None  # see ``row_noise``; None: not measured

    def within(self, tolerance_ulps: float) -> bool:
        return self.ulps <= tolerance_ulps

    @property
    def explained_by_rounding(self) -> bool | None:
        """Whether the margin is within twice the row noise at this position: if no logit
        moves by more than the noise, a flip of the argmax needs a margin below twice it."""
        return None if self.row_noise is None else self.margin <= 2 * self.row_noise


@dataclass
class LosslessReport:
    """Every emitted token checked against mlx-lm's greedy choice after the same prefix."""

    dtype: str
    tolerance_ulps: float
    n_tokens: int
    divergences: list[Divergence] = field(default_factory=list)

    @property
    def max_margin(self) -> float:
        return max((d.margin for d in self.divergences), default=0.0)

    @property
    def max_ulps(self) -> float:
        return max((d.ulps for d in self.divergences), default=0.0)

    @property
    def passed(self) -> bool:
        return all(d.within(self.tolerance_ulps) for d in self.divergences)

    @property
    def exact(self) -> bool:
        return not self.divergences

    @property
    def unexplained(self) -> list[Divergence]:
        """Divergences whose margin the measured row noise does not cover."""
        return [d for d in self.divergences if d.explained_by_rounding is False]

    def summary(self) -> str:
        verdict = "exact" if self.exact else "pass" if self.passed else "FAIL"
        out = (f"{verdict}: {self.n_tokens} tokens, {len(self.divergences)} not mlx-lm's "
               f"argmax ({self.dtype}, tolerance {self.tolerance_ulps:g} ulps)")
        if self.divergences:
            out += f", max margin {self.max_margin:.4g} logits ({self.max_ulps:.3g} ulps)"
            measured = [d for d in self.divergences if d.row_noise is not None]
            if measured:
                out += (f"; {len(measured) - len(self.unexplained)} of {len(measured)} "
                        "within twice the row noise")
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "max_margin": self.max_margin, "max_ulps": self.max_ulps,
               "passed": self.passed, "exact": self.exact}
        for d, row in zip(self.divergences, out["divergences"], strict=True):
            row["explained_by_rounding"] = d.explained_by_rounding
        return out

    def merge(self, other: LosslessReport) -> LosslessReport:
        """One report over two outputs (positions stay those of each output)."""
        if (other.dtype, other.tolerance_ulps) != (self.dtype, self.tolerance_ulps):
            raise ValueError("reports of different dtypes or tolerances do not merge")
        return LosslessReport(self.dtype, self.tolerance_ulps, self.n_tokens + other.n_tokens,
                              self.divergences + other.divergences)


def _mlx_lm_model(model: nn.Module | str | Path) -> nn.Module:
    if isinstance(model, (str, Path)):
        from mlx_lm.utils import load_model

        return load_model(Path(model))[0]
    base = getattr(model, "base", None)  # a SpecStreamModel wraps mlx-lm's model
    return base if base is not None else model


def teacher_force(
    model: nn.Module, prompt: Sequence[int] | mx.array, tokens: Sequence[int]
) -> Iterator[tuple[int, float, float]]:
    """mlx-lm's ``generate_step`` fed our ``tokens``: per token, mlx-lm's choice, its
    logit and our token's logit (the model-dtype logits, as floats)."""
    prompt = mx.array(prompt, dtype=mx.uint32) if not isinstance(prompt, mx.array) else prompt
    forced = iter(int(t) for t in tokens)
    seen: list[mx.array] = []
    stats: list[mx.array] = []

    def record_logits(_tokens: mx.array, logits: mx.array) -> mx.array:
        seen.append(logits)
        return logits  # unchanged: the step computes exactly what mlx-lm computes

    def sampler(logprobs: mx.array) -> mx.array:
        choice = mx.argmax(logprobs, axis=-1)  # mlx-lm's greedy sampler
        token = next(forced, None)
        if token is None:  # generate_step queues one step past max_tokens
            return choice
        z = seen.pop()[0].astype(mx.float32)
        stats.append(mx.concatenate([choice.astype(mx.float32), z[choice], z[token : token + 1]]))
        return mx.array([token], dtype=choice.dtype)

    steps = generate_step(prompt, model, max_tokens=len(tokens), sampler=sampler,
                          logits_processors=[record_logits])
    for n, (token, _) in enumerate(steps):
        if int(token) != int(tokens[n]):
            raise RuntimeError("mlx-lm's generate_step did not take the forced token")
        choice, top, ours = stats[n].tolist()
        yield int(choice), top, ours


def check_greedy(
    model: nn.Module | str | Path,
    prompt: Sequence[int] | mx.array,
    tokens: Sequence[int],
    *,
    tolerance_ulps: float | None = None,
    dtype: str | None = None,
    noise_rows: int = 16,
) -> LosslessReport:
    """Teacher-force mlx-lm's model with ``prompt`` + ``tokens`` (our greedy output) and
    report every token that is not mlx-lm's greedy choice, with its margin.

    model: a model folder, a ``SpecStreamModel`` (its mlx-lm base is used) or an mlx-lm
    model.  tolerance_ulps: the largest margin that passes, in rounding steps of the
    logits' dtype at the top logit (default ``DEFAULT_TOLERANCE_ULPS`` of that dtype).
    dtype: the precision whose rounding steps measure margins and tolerance, when it is
    not the logits' own (e.g. a float32 model under bfloat16 ``row_dependent_rounding``).
    noise_rows: at each divergence, measure ``row_noise`` over this many rows (0: not)."""
    base = _mlx_lm_model(model)
    prompt = [int(t) for t in (prompt.tolist() if isinstance(prompt, mx.array) else prompt)]
    dtype = logits_dtype(base) if dtype is None else dtype
    tol = DEFAULT_TOLERANCE_ULPS.get(dtype) if tolerance_ulps is None else float(tolerance_ulps)
    if tol is None or tol < 0:
        raise ValueError(f"tolerance_ulps must be >= 0 (no default for dtype {dtype})")
    tokens = [int(t) for t in tokens]
    report = LosslessReport(dtype=dtype, tolerance_ulps=tol, n_tokens=len(tokens))
    if not tokens:
        return report
    for position, (choice, top, ours) in enumerate(teacher_force(base, prompt, tokens)):
        token = tokens[position]
        if choice != token:
            margin = top - ours
            report.divergences.append(Divergence(
                position=position, token=token, argmax=choice, margin=margin,
                ulps=margin / ulp(top, dtype), top_logit=top,
            ))
    for d in report.divergences if noise_rows > 0 else []:
        context = prompt + tokens[: d.position]
        if len(context) >= 2:  # a one-token context has no multi-row pass to compare
            d.row_noise = row_noise(base, context, noise_rows)
    return report


def row_noise(model: nn.Module, context: Sequence[int], rows: int = 16) -> float:
    """How much the logits after ``context`` depend on how many rows share their pass:
    the largest |change| of a logit between one pass over the last ``rows`` tokens and
    one-row passes over them (both after the same prefill of the rest), through the
    mlx-lm ``model``.  0 where the matrix kernels are row-invariant."""
    context = [int(t) for t in context]
    rows = min(rows, len(context))
    if rows < 2:
        raise ValueError("row noise needs a context of at least 2 tokens")
    head, tail = context[:-rows], context[-rows:]

    def prefilled() -> list[Any]:
        cache = make_prompt_cache(model)
        if head:
            model(mx.array(head)[None], cache=cache)
            mx.eval([c.state for c in cache])
        return cache

    multi = model(mx.array(tail)[None], cache=prefilled())[0, -1]
    cache = prefilled()
    for t in tail:
        single = model(mx.array([[t]]), cache=cache)[0, -1]
        mx.eval(single)
    diff = mx.abs(multi.astype(mx.float32) - single.astype(mx.float32)).max()
    return float(diff.item())


def save_report(report: LosslessReport, path: str | Path) -> None:
    from .files import atomic_write_text

    atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")


# ---------------------------------------------------------- row-dependent rounding


def _split_k_product(x: mx.array, w: mx.array, dtype: mx.Dtype | None) -> mx.array:
    """``x @ w.T`` as two half-depth products, each rounded to ``dtype``, then added: the
    kind of reordering a multi-row GPU kernel makes relative to a one-row one."""
    dtype = x.dtype if dtype is None else dtype
    k = x.shape[-1] // 2
    lo = (x[..., :k] @ w[:, :k].T).astype(dtype)
    hi = (x[..., k:] @ w[:, k:].T).astype(dtype)
    return (lo + hi).astype(x.dtype)


@contextlib.contextmanager
def row_dependent_rounding(dtype: mx.Dtype | None = None) -> Iterator[None]:
    """Within the block, every ``nn.Linear`` and tied LM head (``Embedding.as_linear``)
    computes products over more than one row by ``_split_k_product`` (partial sums
    rounded to ``dtype``, default the input's), one-row products as before.  A CPU
    stand-in for kernels chosen by row count: a tree node's logits then differ from a
    one-token pass, as on a GPU.  Patches the classes, so it affects every model in the
    process; not thread-safe."""
    linear_call, as_linear = nn.Linear.__call__, nn.Embedding.as_linear

    def one_row(x: mx.array) -> bool:
        return x.size <= x.shape[-1]

    def linear(self: nn.Linear, x: mx.array) -> mx.array:
        if one_row(x):
            return linear_call(self, x)
        y = _split_k_product(x, self["weight"], dtype)
        return y + self["bias"] if "bias" in self else y

    def embedding_as_linear(self: nn.Embedding, x: mx.array) -> mx.array:
        if one_row(x):
            return as_linear(self, x)
        return _split_k_product(x, self.weight, dtype)

    nn.Linear.__call__, nn.Embedding.as_linear = linear, embedding_as_linear
    try:
        yield
    finally:
        nn.Linear.__call__, nn.Embedding.as_linear = linear_call, as_linear
