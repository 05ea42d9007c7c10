"""Merge task-mode LoRA adapters into the model weights: a new model folder.

The folder is written to a temporary name beside OUTPUT and renamed into place, so a
reader never sees a half-written model; an existing OUTPUT is replaced only with
--force.  The streams trained with the adapters (specstream.safetensors and the
config section) are carried into the new folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from ..config import CONFIG_KEY, STREAMS_FILE
from .trainer import ADAPTER_CONFIG, replace_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model folder (default: the default model)")
    p.add_argument("--adapter-path", required=True,
                   help="folder with adapters.safetensors + adapter_config.json "
                        "(from train --mode task)")
    p.add_argument("--output", required=True, help="the new model folder")
    p.add_argument("--dequantize", action="store_true", help="write a dequantized model")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")


def fuse(
    model_path: str | Path,
    adapter_path: str | Path,
    output: str | Path,
    dequantize: bool = False,
    force: bool = False,
) -> Path:
    """Fuse the LoRA of ``adapter_path`` into ``model_path``'s weights, writing ``output``."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, load_model, load_tokenizer, save

    model_path, adapter_path, output = Path(model_path), Path(adapter_path), Path(output)
    if not (adapter_path / ADAPTER_CONFIG).exists():
        raise FileNotFoundError(f"{adapter_path / ADAPTER_CONFIG} not found")
    if output.exists() and not force:
        raise FileExistsError(f"{output} exists (use --force to replace it)")
    if output.resolve() == model_path.resolve():
        raise ValueError("OUTPUT must differ from the model folder")

    model, config = load_model(model_path)
    tokenizer = load_tokenizer(model_path, eos_token_ids=config.get("eos_token_id"))
    load_adapters(model, str(adapter_path))
    fused = [
        (n, m.fuse(dequantize=dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)

    streams_cfg = adapter_path / "config.json"
    if streams_cfg.exists():
        section = json.loads(streams_cfg.read_text()).get(CONFIG_KEY)
        if section is not None:
            config[CONFIG_KEY] = section
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp, model_path, model, tokenizer, config, donate_model=False)
        src_streams = adapter_path / STREAMS_FILE
        if src_streams.exists():
            shutil.copy2(src_streams, tmp / STREAMS_FILE)
        replace_dir(tmp, output, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def run(args: argparse.Namespace) -> int:
    from ..models import resolve_model

    model_path = resolve_model(args.model)
    out = fuse(model_path, args.adapter_path, args.output, args.dequantize, args.force)
    print(f"fused {args.adapter_path} into {model_path}: {out}")
    return 0
