"""The umbrella command: ``mlx-specstream <subcommand> ...``.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches and turns library errors into
one-line messages.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("mlx_specstream.convert.cli", "convert a HF folder or GGUF file to a model folder"),
    "generate": ("mlx_specstream.generate_cli", "generate text from a prompt"),
    "chat": ("mlx_specstream.chat", "chat in the terminal"),
    "serve": ("mlx_specstream.server", "serve an OpenAI-compatible HTTP API"),
    "train": ("mlx_specstream.training.cli", "train the speculative streams"),
    "distill": ("mlx_specstream.training.distill", "write self-distillation data"),
    "fuse": ("mlx_specstream.training.fuse", "merge task-mode LoRA into the weights"),
    "calibrate": ("mlx_specstream.calibrate", "size the draft tree for this machine"),
    "vocab": ("mlx_specstream.vocab", "let the streams draft from the most frequent tokens"),
    "corpus": ("mlx_specstream.corpus", "draft from the model's past answers"),
    "doctor": ("mlx_specstream.doctor", "check the BLAS, GEMM shim and matmul speed"),
    "check": ("mlx_specstream.check_cli", "check greedy output against mlx-lm's, token by token"),
}


# name -> the description `mlx-specstream NAME --help` prints (for users, not developers)
DESCRIPTIONS: dict[str, str] = {
    "convert": "Convert a Hugging Face model folder, a .gguf file (any common tensor type) or a\n"
    "built-in model by name into a model folder that mlx-specstream (and mlx_lm.load) reads.\n"
    "Without -o the folder is ./<source name>-mlx.\n"
    "Fresh streams do not draft until trained: the command prints the distill, train and\n"
    "calibrate steps.  --force onto a folder with trained streams keeps them when they fit.\n"
    "\n"
    "examples:\n"
    "  mlx-specstream convert path/to/hf-folder -o models/llama-ss\n"
    "  mlx-specstream convert SmolLM2-135M-Instruct.Q4_1.gguf --num-streams 3\n"
    "  mlx-specstream convert path/to/hf-folder -o models/llama-ss-4bit -q --q-bits 4\n"
    "  mlx-specstream convert Qwen/Qwen2.5-Coder-0.5B-Instruct -o models/qwen-coder",
    "generate": "Generate a reply to a prompt and print it as it streams, then the speeds, "
    "tokens per forward pass (tokens from the passes after the prefill / those passes), the "
    "acceptance per draft depth and the peak memory.  The prompt goes through the chat "
    "template unless --ignore-chat-template is given.",
    "chat": "Chat with a model in the terminal.  Type /help for the commands (/reset, /stats, "
    "/quit ...).",
    "serve": "Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
    "/v1/completions, /v1/models).  Requests that omit temperature, top_p or max_tokens get "
    "--temp, --top-p and --max-tokens.",
    "train": "Train the speculative streams of a model folder on chat data (train.jsonl and "
    "valid.jsonl, e.g. from `mlx-specstream distill`), so that decoding drafts and accepts "
    "several tokens per forward pass.",
    "distill": "Write training data for `mlx-specstream train`: the model's own answers to "
    "chat prompts, in OUTPUT/train.jsonl and OUTPUT/valid.jsonl.  An interrupted run resumes.",
    "fuse": "Merge the task-mode LoRA adapters of `mlx-specstream train --mode task` into the "
    "model weights.",
    "calibrate": "Measure this machine's cost of a forward pass per draft-tree size and store "
    "the fastest draft tree in the model folder.  Run it once per machine after training.",
    "vocab": "Count the tokens of texts the model wrote (distill's train.jsonl) and let the "
    "streams draft from the --size most frequent ones: their LM head then computes those rows "
    "only.  Verification keeps the whole head, so the output does not change.  --size 0 "
    "drafts from the whole vocabulary again.",
    "corpus": "Tokenize texts the model wrote (distill's train.jsonl) into the folder's "
    "draft corpus.  When the context holds no earlier match of its own suffix, the context "
    "branch (lookup_branches) then drafts the continuation that most often followed the "
    "context's longest suffix in the corpus.  Drafts are verified, so the output does not "
    "change.",
    "doctor": "Show the BLAS, the matmul backend and the matmul speed of this machine.",
    "check": "Generate greedily, then feed the output through mlx-lm's own decoding loop "
    "on the same model and list every token that is not mlx-lm's greedy choice, with its "
    "margin (the logit of mlx-lm's choice minus ours).  Exits with status 1 when a margin "
    "exceeds the tolerance.\n"
    "\n"
    "examples:\n"
    "  mlx-specstream check --prompt \"Write a haiku about the sea.\"\n"
    "  mlx-specstream check --model models/llama-ss --dtype bfloat16 --max-tokens 128",
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (mod, help_) in SUBCOMMANDS.items():
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            out[name] = (mod, help_)
    return out


def main(argv: list[str] | None = None) -> int:
    from importlib.metadata import PackageNotFoundError, version

    import mlx_specstream  # noqa: F401  (BLAS set-up before anything imports mlx.core)

    try:
        ver = version("mlx-specstream")
    except PackageNotFoundError:
        ver = "unknown (not installed)"
    parser = argparse.ArgumentParser(
        prog="mlx-specstream",
        description="Fast LLM inference on MLX with Speculative Streaming: convert a model, "
                    "train its streams, and generate, chat or serve.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {ver}")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (mod_name, help_) in _available().items():
        mod = importlib.import_module(mod_name)
        p = sub.add_parser(name, help=help_, description=DESCRIPTIONS.get(name, help_))
        mod.add_arguments(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as e:
        print(f"mlx-specstream {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
