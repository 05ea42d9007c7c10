"""Streaming tokens into a callback, the way an app (a macOS app, say) would use it.

The generation runs on a background thread and calls ``on_text`` for every piece of
text; the UI thread may cancel at any time by setting a flag, and the generation
stops before its next token.  ``on_done`` gets the final statistics.  Threads may
share one loaded (model, tokenizer); a thread that ran MLX work calls
``mx.clear_streams()`` before it ends.

    python examples/stream_callback.py [MODEL_FOLDER]
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import mlx_specstream  # noqa: F401  (before mlx.core)
from mlx_specstream import GenerationResponse, load, stream_generate

import mlx.core as mx


class Generation:
    """One generation on a background thread, with a per-token callback."""

    def __init__(
        self,
        model,
        tokenizer,
        prompt: str,
        on_text: Callable[[str], None],
        on_done: Callable[[GenerationResponse | None, bool], None],
        max_tokens: int = 256,
    ) -> None:
        self._cancel = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(model, tokenizer, prompt, on_text, on_done, max_tokens),
            daemon=True,
        )

    def start(self) -> Generation:
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the generation to stop; it does so before its next token."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self, model, tokenizer, prompt, on_text, on_done, max_tokens) -> None:
        # Apply the chat template as a chat app would.
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
        last = None
        gen = stream_generate(model, tokenizer, ids, max_tokens)
        try:
            for r in gen:
                if self._cancel.is_set():
                    break
                if r.text:
                    on_text(r.text)  # in an app: hop to the main thread here
                last = r
        finally:
            gen.close()  # frees the generation's cache at once
            on_done(last, self._cancel.is_set())
            # MLX needs each worker thread's streams freed before the thread ends;
            # otherwise the process may abort when it exits.
            if hasattr(mx, "clear_streams"):
                mx.clear_streams()


def main() -> None:
    model, tokenizer = load(sys.argv[1] if len(sys.argv) > 1 else None)

    def on_text(piece: str) -> None:
        print(piece, end="", flush=True)

    def on_done(last: GenerationResponse | None, cancelled: bool) -> None:
        print()
        if last is not None:
            print(
                f"[{'cancelled' if cancelled else last.finish_reason}: "
                f"{last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s, "
                f"{last.tokens_per_pass:.2f} tokens per forward pass]"
            )

    # One generation to the end, then one cancelled after half a second.
    Generation(model, tokenizer, "Name three rivers.", on_text, on_done, 64).start().wait()
    g = Generation(model, tokenizer, "Tell me a long story.", on_text, on_done, 1000).start()
    time.sleep(0.5)
    g.cancel()
    g.wait()


if __name__ == "__main__":
    main()
