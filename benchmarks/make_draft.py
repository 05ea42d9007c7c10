"""A draft model for mlx-lm's two-model speculative decoding, made from the target itself:
its first N decoder layers, its final norm and its (tied) LM head, so that it shares
the tokenizer.  Optionally briefly distilled afterwards (see scripts/make_draft.sh):
task-mode LoRA on the target's own greedy answers, then fused.

    python benchmarks/make_draft.py --layers 6 --output DIR [--model PATH] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)

import mlx.core as mx


def truncate(model: Path, layers: int, output: Path, force: bool = False) -> Path:
    """Write the first ``layers`` layers of ``model`` as a new mlx-lm folder."""
    config = json.loads((model / "config.json").read_text())
    total = config["num_hidden_layers"]
    if not 1 <= layers < total:
        raise ValueError(f"--layers must be in 1..{total - 1}, got {layers}")
    if output.exists() and not force:
        raise FileExistsError(f"{output} exists (use --force to replace it)")
    weights: dict[str, mx.array] = {}
    for f in sorted(model.glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    if not weights:
        raise FileNotFoundError(f"no model*.safetensors in {model}")
    kept = {}
    for k, v in weights.items():
        if k.startswith("model.layers."):
            if int(k.split(".")[2]) >= layers:
                continue
        kept[k] = v
    config["num_hidden_layers"] = layers
    config.pop("speculative_streaming", None)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), kept, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    for f in model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, tmp / f.name)
    if output.exists():
        shutil.rmtree(output)
    os.replace(tmp, output)
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="target folder (default: the default model)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--output", required=True)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    from mlx_specstream.models import resolve_model

    model = resolve_model(args.model)
    out = truncate(Path(model), args.layers, Path(args.output), args.force)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
