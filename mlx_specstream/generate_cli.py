"""Generate text from a prompt: ``mlx-specstream generate --model PATH --prompt TEXT``.

The prompt goes through the tokenizer's chat template (as with ``mlx_lm.generate``)
unless --ignore-chat-template is given.  The text is printed as it streams, followed
by the prompt and generation speeds, tokens per forward pass, the acceptance per
draft depth and the peak memory.

This module also holds the helpers that ``chat`` and ``serve`` share: the sampling
and decoding flags, the pass-through of sampling parameters to ``stream_generate``
and the chat-prompt construction.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import mlx_specstream  # noqa: F401  (BLAS set-up before mlx.core is imported)

from .generate import GenerationResponse, format_stats, load, stream_generate
from .sampling import SamplingParams
from .tree import add_tree_topk_argument

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 100

# mlx-lm's names for the sampling parameters, in the order of its CLI.
SAMPLING_PARAMS: tuple[str, ...] = (
    "temp",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "repetition_context_size",
    "seed",
)


# --------------------------------------------------------------------------- flags


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model folder or built-in model name: HuggingFaceTB/SmolLM2-135M-Instruct "
        "(the default) or Qwen/Qwen2.5-Coder-0.5B-Instruct",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """mlx-lm's sampling flags; each defaults to None (= not passed on)."""
    g = parser.add_argument_group("sampling (greedy unless --temp > 0)")
    g.add_argument("--temp", type=float, default=None, help="sampling temperature (default 0)")
    g.add_argument("--top-p", type=float, default=None, help="sampling top-p")
    g.add_argument("--top-k", type=int, default=None, help="sampling top-k")
    g.add_argument("--min-p", type=float, default=None, help="sampling min-p")
    g.add_argument(
        "--repetition-penalty", type=float, default=None, help="repetition penalty (1 = off)"
    )
    g.add_argument("--seed", type=int, default=None, help="PRNG seed")


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speculative decoding")
    g.add_argument(
        "--no-speculative",
        action="store_true",
        help="plain autoregressive decoding in the same runtime (for comparison)",
    )
    add_tree_topk_argument(
        g, help="candidates per depth of the draft tree, e.g. 3,2,1 (default: the model's)"
    )
    g.add_argument(
        "--prune-threshold",
        type=float,
        default=None,
        help="early-exit pruning threshold, 0 disables (default: the model's)",
    )
    g.add_argument(
        "--dynamic-tree",
        action="store_true",
        help="size a draft chain per step from the streams' confidences (greedy only: "
        "refused with --temp > 0 or a repetition penalty)",
    )
    g.add_argument(
        "--lookup-branches",
        type=int,
        default=None,
        metavar="N",
        help="add the continuation (at most N tokens) of an n-gram the context repeats "
        "to the draft tree, 0 disables (default: the model's)",
    )
    g.add_argument(
        "--lookup-skip-streams",
        type=int,
        default=None,
        metavar="N",
        help="run a pass without the stream rows when its context branch has at least N "
        "tokens (copied text), 0: never (default: the model's)",
    )
    g.add_argument(
        "--no-lookup-corpus",
        action="store_true",
        help="the context branch drafts from the context only, not from the folder's corpus "
        "of the model's past answers (mlx-specstream corpus)",
    )


def decoding_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The speculative-decoding keyword arguments of ``stream_generate`` from the flags."""
    kw: dict[str, Any] = {"speculative": not getattr(args, "no_speculative", False)}
    if getattr(args, "tree_topk", None) is not None:
        kw["tree_topk"] = list(args.tree_topk)
    if getattr(args, "prune_threshold", None) is not None:
        kw["prune_threshold"] = float(args.prune_threshold)
    if getattr(args, "dynamic_tree", False):
        kw["dynamic_tree"] = True
    if getattr(args, "lookup_branches", None) is not None:
        if args.lookup_branches < 0:
            raise ValueError(f"--lookup-branches must be >= 0, got {args.lookup_branches}")
        kw["lookup_branches"] = int(args.lookup_branches)
    if getattr(args, "lookup_skip_streams", None) is not None:
        if args.lookup_skip_streams < 0:
            raise ValueError(
                f"--lookup-skip-streams must be >= 0, got {args.lookup_skip_streams}")
        kw["lookup_skip_streams"] = int(args.lookup_skip_streams)
    if getattr(args, "no_lookup_corpus", False):
        kw["lookup_corpus"] = False
    if kw.get("dynamic_tree") and not is_greedy(
        getattr(args, "temp", None), getattr(args, "repetition_penalty", None)
    ):
        raise ValueError(
            "--dynamic-tree decodes greedily only: drop it, or use --temp 0 without "
            "--repetition-penalty"
        )
    return kw


def is_greedy(temp: float | None, repetition_penalty: float | None) -> bool:
    """Whether these sampling options decode greedily (the plain model's argmax)."""
    return not temp and repetition_penalty in (None, 1.0)


# --------------------------------------------------------------- sampling pass-through


def sampling_kwargs(
    *,
    temp: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The sampling options given (not None), to pass on to ``stream_generate``.

    They are checked here, by ``SamplingParams`` (their one validator), so that a bad
    value is refused before the model loads; ValueError names the option."""
    given = {
        k: v
        for k, v in (
            ("temp", temp),
            ("top_p", top_p),
            ("top_k", top_k),
            ("min_p", min_p),
            ("repetition_penalty", repetition_penalty),
            ("repetition_context_size", repetition_context_size),
            ("seed", seed),
        )
        if v is not None
    }
    SamplingParams(**given)
    return given


def sampling_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return sampling_kwargs(**{k: getattr(args, k, None) for k in SAMPLING_PARAMS})


# ------------------------------------------------------------------------ prompts


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "has_chat_template", False)) or bool(
        getattr(tokenizer, "chat_template", None)
    )


def _fallback_chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant:"


def chat_prompt_ids(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template, ready for the
    assistant's reply (as mlx-lm does: the templated text is encoded without adding
    special tokens).  A tokenizer without a template gets a plain "role: text" layout.
    template_kwargs: further arguments of ``apply_chat_template`` (--chat-template-config)."""
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True,
            **dict(template_kwargs or {}),
        )
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(_fallback_chat_prompt(messages)))


def format_acceptance(r: GenerationResponse) -> str:
    """Per-depth acceptance: the share of passes accepting at least d drafted tokens."""
    if not r.accepted_per_depth:
        return "Acceptance per depth: n/a (no drafts)"
    n = max(r.forward_passes, 1)
    parts = [f"d{d} {100.0 * a / n:.1f}%" for d, a in enumerate(r.accepted_per_depth, start=1)]
    return "Acceptance per depth: " + ", ".join(parts)


# ------------------------------------------------------------------- mlx-lm flags


def add_mlx_lm_arguments(parser: argparse.ArgumentParser) -> None:
    """mlx-lm's --max-kv-size, --extra-eos-token and --chat-template-config."""
    g = parser.add_argument_group("mlx-lm options")
    g.add_argument(
        "--extra-eos-token",
        nargs="+",
        default=None,
        metavar="TOKEN",
        help="further tokens that end generation (as the EOS token does)",
    )
    g.add_argument(
        "--chat-template-config",
        default=None,
        metavar="JSON",
        help='JSON object of extra apply_chat_template arguments, e.g. \'{"enable_thinking": '
        "false}'",
    )
    g.add_argument(
        "--max-kv-size",
        type=int,
        default=None,
        help="not supported (the cache holds the whole context): refused when given",
    )


def template_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """--chat-template-config as a dict; refuses --max-kv-size."""
    if getattr(args, "max_kv_size", None) is not None:
        raise ValueError(
            "--max-kv-size is not supported: the KV cache holds the whole context (a rotating "
            "cache would drop the tokens the draft tree is verified against); leave it out"
        )
    text = getattr(args, "chat_template_config", None)
    if not text:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--chat-template-config is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError("--chat-template-config must be a JSON object, e.g. '{\"key\": 1}'")
    return config


def add_extra_eos_tokens(tokenizer: Any, args: argparse.Namespace) -> None:
    """Make the --extra-eos-token tokens end generation."""
    for token in getattr(args, "extra_eos_token", None) or []:
        try:
            tokenizer.add_eos_token(token)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--extra-eos-token {token!r}: {e}") from None


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding, sampling and mlx-lm flags of ``generate`` and ``chat``."""
    add_decoding_arguments(parser)
    add_sampling_arguments(parser)
    add_mlx_lm_arguments(parser)


def generation_setup(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """(model, tokenizer, stream_generate keywords, chat-template keywords) from the
    flags of ``add_generation_arguments``; the flags are checked before the model loads."""
    gen_kwargs = {**decoding_kwargs(args), **sampling_kwargs_from_args(args)}
    template_kwargs = template_kwargs_from_args(args)
    model, tokenizer = load(args.model)
    add_extra_eos_tokens(tokenizer, args)
    return model, tokenizer, gen_kwargs, template_kwargs


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument(
        "--prompt", "-p", default=DEFAULT_PROMPT, help="the prompt ('-' reads from stdin)"
    )
    parser.add_argument(
        "--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS, help="tokens to generate"
    )
    parser.add_argument("--system-prompt", default=None, help="system prompt for the template")
    parser.add_argument(
        "--ignore-chat-template",
        "--no-chat-template",
        dest="ignore_chat_template",
        action="store_true",
        help="use the raw prompt without the tokenizer's chat template",
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop string (may be repeated); generation ends before it",
    )
    parser.add_argument(
        "--verbose",
        type=_bool,
        default=True,
        metavar="{True,False}",
        help="print the statistics after the text (default True; False: the text only)",
    )
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    prompt_text = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    if prompt_text == "-":
        prompt_text = sys.stdin.read()
    model, tokenizer, gen_kwargs, template_kwargs = generation_setup(args)
    if args.stop:
        gen_kwargs["stop"] = list(args.stop)
    prompt: str | list[int]
    if not args.ignore_chat_template and has_chat_template(tokenizer):
        messages = []
        if args.system_prompt is not None:
            messages.append({"role": "system", "content": args.system_prompt})
        messages.append({"role": "user", "content": prompt_text})
        prompt = chat_prompt_ids(tokenizer, messages, template_kwargs)
    else:
        prompt = prompt_text
    verbose = getattr(args, "verbose", True)
    if verbose:
        print("=" * 10)
    last: GenerationResponse | None = None
    for r in stream_generate(model, tokenizer, prompt, args.max_tokens, **gen_kwargs):
        print(r.text, end="", flush=True)
        last = r
    print()
    if verbose:
        print("=" * 10)
    if verbose and last is not None:
        print(format_stats(last))
        print(format_acceptance(last))
    return 0
