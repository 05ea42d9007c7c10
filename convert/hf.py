"""Read a Hugging Face model folder: config.json, safetensors weights, tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx

from .source import Source

#: Files copied verbatim from a HF folder (tokenizer and generation settings).
TOKENIZER_GLOBS = (
    "*.json",
    "*.jinja",
    "*.model",
    "*.tiktoken",
    "*.txt",
)
#: JSON files that are not tokenizer files and are written by the converter itself.
_NOT_COPIED = {"config.json", "model.safetensors.index.json"}
#: At least one of these must exist for the folder to have a usable tokenizer.
TOKENIZER_MAIN_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files that hold the weights of ``folder`` (index first, then globs)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'; the index file is corrupt")
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise FileNotFoundError(
                f"{index.name} lists shard(s) that are not in {folder}: {', '.join(missing)} "
                "(incomplete download?)"
            )
        return files
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        files = sorted(
            f for f in folder.glob("*.safetensors") if not f.name.startswith("specstream")
        )
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {folder}; a Hugging Face folder needs "
            "model.safetensors or model-0000x-of-0000n.safetensors (PyTorch .bin files are "
            "not supported: convert them to safetensors first)"
        )
    return files


def load_safetensors(path: Path) -> dict[str, mx.array]:
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises RuntimeError for corrupt files
        raise ValueError(
            f"cannot read {path.name} ({e}); the file is corrupt or truncated: download it again"
        ) from e


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for pattern in TOKENIZER_GLOBS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and f.name not in _NOT_COPIED:
                shutil.copy2(f, dst / f.name)


def read_hf_folder(folder: Path) -> Source:
    """Read config, (lazily loaded) weights and tokenizer file list of a HF folder."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"{folder} has no config.json; pass a Hugging Face model folder "
            "(config.json, *.safetensors, tokenizer files) or a .gguf file"
        )
    config = read_json(config_path)
    if "model_type" not in config:
        raise ValueError(f"{config_path} has no 'model_type'")
    if "quantization" not in config and isinstance(config.get("quantization_config"), dict):
        method = config["quantization_config"].get("quant_method", "unknown")
        raise ValueError(
            f"{folder} holds a '{method}'-quantized checkpoint, which cannot be converted; "
            "convert the float (bf16/fp16/fp32) checkpoint and pass -q to quantize"
        )
    if not any((folder / f).exists() for f in TOKENIZER_MAIN_FILES) and not list(
        folder.glob("*.tiktoken")
    ):
        raise FileNotFoundError(
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_MAIN_FILES)}); "
            "copy the tokenizer files of the model into the folder"
        )

    files = weight_files(folder)
    weights: dict[str, mx.array] = {}
    origin: dict[str, str] = {}
    for f in files:
        for name, value in load_safetensors(f).items():
            if name in weights:
                raise ValueError(f"tensor {name} appears in both {origin[name]} and {f.name}")
            weights[name] = value
            origin[name] = f.name

    quantization = config.get("quantization")
    return Source(
        path=folder,
        kind="hf",
        config=config,
        weights=weights,
        origin=origin,
        quantization=dict(quantization) if isinstance(quantization, dict) else None,
        write_tokenizer=lambda dst: _copy_tokenizer_files(folder, dst),
    )
