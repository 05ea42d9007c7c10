"""``mlx-specstream check``: generate greedily, then check every token against mlx-lm.

The output is teacher-forced through mlx-lm's ``generate_step`` on the same model
(``lossless.check_greedy``); each token that is not mlx-lm's greedy choice is listed
with its margin.  The exit status is 1 when a margin exceeds the tolerance.
"""

from __future__ import annotations

import argparse

import mlx_specstream  # noqa: F401  (BLAS set-up before mlx.core is imported)

from .generate import load, stream_generate
from .generate_cli import (
    add_decoding_arguments,
    add_model_argument,
    chat_prompt_ids,
    decoding_kwargs,
    has_chat_template,
)
from .lossless import DEFAULT_TOLERANCE_ULPS, check_greedy, save_report

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--prompt", "-p", default="hello", help="the prompt")
    parser.add_argument("--max-tokens", "-m", type=int, default=64, help="tokens to generate")
    parser.add_argument(
        "--ignore-chat-template", action="store_true",
        help="use the raw prompt without the tokenizer's chat template",
    )
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None,
        help="cast the model to this dtype before decoding (default: the folder's)",
    )
    defaults = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TOLERANCE_ULPS.items())
    parser.add_argument(
        "--tolerance", type=float, default=None, metavar="ULPS",
        help="largest margin that passes, in rounding steps of the logits' dtype at the top "
             f"logit (default: {defaults})",
    )
    parser.add_argument(
        "--noise-rows", type=int, default=16, metavar="N",
        help="at each divergence, measure how much a pass over N rows changes the logits "
             "against one-row passes (0: do not)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the report")
    add_decoding_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.tolerance is not None and args.tolerance < 0:
        raise ValueError(f"--tolerance must be >= 0, got {args.tolerance}")
    model, tokenizer = load(args.model)
    if args.dtype is not None:
        import mlx.core as mx

        model.set_dtype(getattr(mx, args.dtype))
        mx.eval(model.parameters())
    text = args.prompt.replace("\\n", "\n")
    if not args.ignore_chat_template and has_chat_template(tokenizer):
        prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
    else:
        prompt = list(tokenizer.encode(text))
    tokens = []
    for r in stream_generate(model, tokenizer, prompt, args.max_tokens, **decoding_kwargs(args)):
        print(r.text, end="", flush=True)
        tokens.append(r.token)
    print()
    report = check_greedy(model, prompt, tokens, tolerance_ulps=args.tolerance,
                          noise_rows=args.noise_rows)
    for d in report.divergences:
        noise = "" if d.row_noise is None else f", 2 x row noise {2 * d.row_noise:.4g}"
        print(f"token {d.position}: ours {d.token} {tokenizer.decode([d.token])!r}, mlx-lm's "
              f"{d.argmax} {tokenizer.decode([d.argmax])!r}, margin {d.margin:.4g} logits "
              f"({d.ulps:.3g} ulps){noise}")
    print(report.summary())
    if args.json:
        save_report(report, args.json)
    return 0 if report.passed else 1
