"""Convert a Hugging Face folder or a .gguf file into a speculative-streaming model folder.

The output loads with plain ``mlx_lm.load`` and also holds the ``speculative_streaming``
section of config.json and freshly initialised stream parameters (specstream.safetensors),
ready for ``mlx-specstream train``.  Without -o the folder is ./<source name>-mlx.  With
--force onto a model folder whose trained streams fit the new model, those streams and their
settings (calibrated tree, cost ratio) are kept; --fresh-streams starts over.

Examples:
  mlx-specstream convert path/to/hf-folder -o models/llama-ss
  mlx-specstream convert SmolLM2-135M-Instruct.Q4_1.gguf -o models/smollm2 --num-streams 3
  mlx-specstream convert path/to/hf-folder -o models/llama-ss-4bit -q --q-bits 4
  mlx-specstream convert Qwen/Qwen2.5-Coder-0.5B-Instruct -o models/qwen-coder
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import SpecStreamConfig
from ..tree import add_tree_topk_argument
from .writer import DTYPES, convert_checkpoint


def default_output(src: str) -> str:
    """``./<source name>-mlx``: the source folder's or file's name without a .gguf suffix."""
    path = Path(src).expanduser()
    name = path.resolve().name if path.name in ("", ".", "..") else path.name
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    return f"{name or 'model'}-mlx"


#: SpecStreamConfig fields set on the command line: (field, type, help).
_SPEC_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("num_streams", int, "gamma, speculative streams"),
    ("stream_layers", int, "Ns, top layers with multi-stream attention"),
    (
        "prune_threshold",
        float,
        "early-exit probability below which tree nodes are dropped (0: off)",
    ),
    ("adapter_rank", int, "rank of the pruning adapter"),
    ("stream_lora_rank", int, "rank of stream-only LoRA in the MSA layers (0: none)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "src",
        nargs="?",
        help="Hugging Face model folder, .gguf file or built-in model name "
        "(HuggingFaceTB/SmolLM2-135M-Instruct, Qwen/Qwen2.5-Coder-0.5B-Instruct)",
    )
    parser.add_argument(
        "--hf-path", "--model", dest="hf_path", help="same as SRC (mlx_lm.convert's flag)"
    )
    parser.add_argument(
        "-o",
        "--mlx-path",
        dest="mlx_path",
        default=None,
        help="output folder (default: ./<source name>-mlx)",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="type of float weights (default float32: fastest on CPUs)",
    )
    parser.add_argument(
        "-q", "--quantize", action="store_true", help="quantize linear layers (mlx-lm affine)"
    )
    parser.add_argument("--q-bits", type=int, default=4, help="bits per weight with -q")
    parser.add_argument("--q-group-size", type=int, default=64, help="group size with -q")
    parser.add_argument(
        "--keep-gguf-quant",
        action="store_true",
        help="keep a GGUF's Q4_0/Q4_1/Q8_0 quantization instead of dequantizing",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing output folder (its trained streams are kept when they fit)",
    )
    parser.add_argument(
        "--fresh-streams",
        action="store_true",
        help="with --force: write fresh streams even when the existing ones fit",
    )
    d = SpecStreamConfig()
    g = parser.add_argument_group("speculative streaming")
    add_tree_topk_argument(
        g, default=d.tree_topk, help="candidates per tree depth, e.g. 3,2,1", several=False
    )
    for field_name, kind, help_text in _SPEC_OPTIONS:
        flag = "--" + field_name.replace("_", "-")
        g.add_argument(flag, type=kind, default=getattr(d, field_name), help=help_text)
    g.add_argument("--seed", type=int, default=0, help="seed of the stream initialisation")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    src = args.src or args.hf_path
    if args.src and args.hf_path and args.src != args.hf_path:
        raise ValueError("give the source once: as SRC or as --hf-path, not both")
    if not src:
        raise ValueError("no source given: pass a Hugging Face folder or a .gguf file")
    mlx_path = args.mlx_path or default_output(src)
    spec = SpecStreamConfig(
        tree_topk=list(args.tree_topk), **{f: getattr(args, f) for f, _, _ in _SPEC_OPTIONS}
    )
    result = convert_checkpoint(
        src,
        mlx_path,
        dtype=args.dtype,
        quantize_bits=args.q_bits if args.quantize else None,
        group_size=args.q_group_size,
        force=args.force,
        spec_config=spec,
        keep_gguf_quant=args.keep_gguf_quant,
        seed=args.seed,
        verbose=True,
        progress=not args.quiet,
        keep_streams=not args.fresh_streams,
    )
    print(f"model folder: {result.path.resolve()}")
    steps = result.next_steps()
    if steps:
        print(steps)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m mlx_specstream.convert.cli``: the same as ``mlx-specstream convert``."""
    import sys

    parser = argparse.ArgumentParser(prog="mlx-specstream convert", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as e:
        print(f"mlx-specstream convert: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
