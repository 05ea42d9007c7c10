"""Chat in the terminal: ``mlx-specstream chat [--model PATH] [--system-prompt S]``.

Each turn goes through the tokenizer's chat template with the whole conversation so
far; the reply streams as it is generated and is followed by one line of speed and
tokens per forward pass.  Commands: /reset (forget the conversation), /stats
(cumulative statistics), /help, /quit or /exit (or end of input).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import mlx_specstream  # noqa: F401  (BLAS set-up before mlx.core is imported)

from .generate import GenerationResponse, stream_generate
from .generate_cli import (
    add_generation_arguments,
    add_model_argument,
    chat_prompt_ids,
    generation_setup,
)

DEFAULT_MAX_TOKENS = 256

HELP = """commands:
  /reset        forget the conversation (keeps the system prompt)
  /stats        cumulative statistics of this session
  /help         this text
  /quit, /exit  leave (so does end of input, Ctrl-D)"""


@dataclass
class ChatStats:
    """Cumulative statistics over the replies of a session."""

    replies: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    generation_s: float = 0.0
    forward_passes: int = 0
    step_tokens: float = 0.0  # tokens produced by the passes (tokens_per_pass * passes)
    accepted_per_depth: list[int] = field(default_factory=list)
    peak_memory: float = 0.0

    def add(self, r: GenerationResponse, seconds: float) -> None:
        self.replies += 1
        self.prompt_tokens += r.prompt_tokens
        self.generation_tokens += r.generation_tokens
        self.generation_s += seconds
        self.forward_passes += r.forward_passes
        self.step_tokens += r.tokens_per_pass * r.forward_passes
        if len(self.accepted_per_depth) < len(r.accepted_per_depth):
            self.accepted_per_depth += [0] * (
                len(r.accepted_per_depth) - len(self.accepted_per_depth)
            )
        for d, a in enumerate(r.accepted_per_depth):
            self.accepted_per_depth[d] += a
        self.peak_memory = max(self.peak_memory, r.peak_memory)

    @property
    def tokens_per_pass(self) -> float:
        return self.step_tokens / self.forward_passes if self.forward_passes else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generation_tokens / self.generation_s if self.generation_s > 0 else 0.0

    def format(self) -> str:
        lines = [
            f"replies: {self.replies}",
            f"prompt tokens: {self.prompt_tokens}",
            f"generated tokens: {self.generation_tokens} "
            f"({self.tokens_per_second:.1f} tokens/s overall, prefill included)",
            f"tokens per forward pass: {self.tokens_per_pass:.2f} "
            f"({round(self.step_tokens)} tokens from {self.forward_passes} passes after the "
            "prefills)",
        ]
        if self.accepted_per_depth and self.forward_passes:
            acc = ", ".join(
                f"d{d} {100.0 * a / self.forward_passes:.1f}%"
                for d, a in enumerate(self.accepted_per_depth, start=1)
            )
            lines.append(f"acceptance per depth: {acc}")
        lines.append(f"peak memory: {self.peak_memory:.3f} GB")
        return "\n".join(lines)


class ChatSession:
    """The chat loop, with injectable input and output streams (for tests).

    ``run()`` reads lines from ``stdin`` until /quit, /exit or end of input and
    returns 0.  ``send(text)`` runs one turn and returns its last response."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        system_prompt: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        gen_kwargs: dict[str, Any] | None = None,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        prompt: str = ">> ",
        stream_fn: Callable[..., Iterator[GenerationResponse]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.gen_kwargs = dict(gen_kwargs or {})
        self.template_kwargs = dict(template_kwargs or {})
        self.stdin = stdin if stdin is not None else sys.stdin
        self.stdout = stdout if stdout is not None else sys.stdout
        self.prompt = prompt
        self.stream_fn = stream_fn or stream_generate
        self.messages: list[dict[str, str]] = []
        self.stats = ChatStats()
        self.reset()

    # ------------------------------------------------------------------ helpers

    def _print(self, text: str = "", end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    def _read(self) -> str | None:
        """The next input line without its newline, or None at end of input."""
        if self.stdin is sys.stdin and sys.stdin.isatty():
            try:
                return input(self.prompt)
            except EOFError:
                return None
        self._print(self.prompt, end="")
        line = self.stdin.readline()
        if not line:
            return None
        return line.rstrip("\r\n")

    def reset(self) -> None:
        self.messages = []
        if self.system_prompt:
            self.messages.append({"role": "system", "content": self.system_prompt})

    # ------------------------------------------------------------------- turns

    def send(self, text: str) -> GenerationResponse | None:
        """One turn: add the user's text, stream the reply, keep it in the history.

        Returns the last response, or None when the turn failed (the conversation no
        longer fits the context, say); the user's text is then dropped again."""
        self.messages.append({"role": "user", "content": text})
        ids = chat_prompt_ids(self.tokenizer, self.messages, self.template_kwargs)
        parts: list[str] = []
        last: GenerationResponse | None = None
        tic = time.perf_counter()
        try:
            for r in self.stream_fn(
                self.model, self.tokenizer, ids, self.max_tokens, **self.gen_kwargs
            ):
                if r.text:
                    self._print(r.text, end="")
                    parts.append(r.text)
                last = r
        except KeyboardInterrupt:
            self._print(" [interrupted]", end="")
        except ValueError as e:
            self.messages.pop()
            self._print(f"error: {e} (/reset starts a new conversation)")
            return None
        seconds = time.perf_counter() - tic
        self._print()
        self.messages.append({"role": "assistant", "content": "".join(parts)})
        if last is not None:
            self.stats.add(last, seconds)
            self._print(
                f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s, "
                f"{last.tokens_per_pass:.2f} tokens/pass]"
            )
        return last

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        cmd = line.strip().split()[0].lower()
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/reset":
            self.reset()
            self._print("[conversation cleared]")
        elif cmd == "/stats":
            self._print(self.stats.format())
        elif cmd in ("/help", "/?"):
            self._print(HELP)
        else:
            self._print(f"unknown command {cmd}; /help lists the commands")
        return True

    def run(self) -> int:
        self._print("type a message, /help for commands, /quit to leave")
        while True:
            line = self._read()
            if line is None:
                self._print()
                return 0
            if not line.strip():
                continue
            if line.lstrip().startswith("/"):
                if not self.command(line):
                    return 0
                continue
            self.send(line)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--system-prompt", default=None, help="system prompt")
    parser.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"tokens per reply at most (default {DEFAULT_MAX_TOKENS})",
    )
    add_generation_arguments(parser)


def run(args: argparse.Namespace) -> int:
    model, tokenizer, gen_kwargs, template_kwargs = generation_setup(args)
    session = ChatSession(
        model,
        tokenizer,
        system_prompt=args.system_prompt,
        max_tokens=args.max_tokens,
        gen_kwargs=gen_kwargs,
        template_kwargs=template_kwargs,
    )
    return session.run()
