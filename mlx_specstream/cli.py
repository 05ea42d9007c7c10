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
    "serve": ("mlx_specstream.server", "OpenAI-compatible HTTP server"),
    "train": ("mlx_specstream.training.cli", "train the speculative streams"),
    "distill": ("mlx_specstream.training.distill", "write self-distillation data"),
    "fuse": ("mlx_specstream.training.fuse", "merge task-mode LoRA into the weights"),
    "calibrate": ("mlx_specstream.calibrate", "measure the forward-pass cost curve"),
    "doctor": ("mlx_specstream.doctor", "show BLAS, backend and matmul speed"),
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
        p = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).strip())
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
