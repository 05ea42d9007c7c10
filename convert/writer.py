"""Write a model folder that plain ``mlx_lm.load`` reads, plus the speculative streams.

The folder holds mlx-lm's format (config.json, model.safetensors or shards with an index,
tokenizer files), a ``speculative_streaming`` section in config.json and the initialised
stream parameters in ``specstream.safetensors`` (which mlx-lm's ``model*.safetensors`` glob
does not pick up).  Everything is written into a temporary folder next to the destination and
renamed into place at the end, so a failed or interrupted conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import CONFIG_KEY, STREAMS_FILE, SUPPORTED_MODEL_TYPES, SpecStreamConfig
from ..files import make_temp_dir, move_into_place
from . import gguf, hf
from .source import Shape, Source

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
QUANT_BITS = (2, 3, 4, 5, 6, 8)
MAX_SHARD_BYTES = 5 << 30


@dataclass
class ConvertResult:
    """What :func:`convert_checkpoint` wrote."""

    path: Path
    source_format: str
    model_type: str
    hidden_size: int
    num_layers: int
    dtype: str
    base_parameters: int
    extra_parameters: int
    stream_file_parameters: int
    quantization: dict[str, Any] | None
    spec_config: SpecStreamConfig
    seconds: float
    files: list[str] = field(default_factory=list)
    kept_streams: bool = False  # the streams and settings of the replaced folder were kept
    notes: list[str] = field(default_factory=list)  # what happened to existing streams

    @property
    def extra_ratio(self) -> float:
        return self.extra_parameters / self.hidden_size

    def summary(self) -> str:
        q = ""
        if self.quantization:
            q = f", {self.quantization['bits']}-bit g{self.quantization['group_size']}"
        return (
            f"wrote {self.path} ({self.model_type}, {self.num_layers} layers, "
            f"{self.base_parameters:,} parameters, {self.dtype}{q}) in {self.seconds:.1f} s\n"
            f"extra parameters: {self.extra_parameters:,} "
            f"({self.extra_ratio:.1f} x hidden {self.hidden_size})"
            + (
                f"; {STREAMS_FILE} holds {self.stream_file_parameters:,} (with stream LoRA)"
                if self.stream_file_parameters != self.extra_parameters
                else ""
            )
            + "".join(f"\n{n}" for n in self.notes)
        )

    def next_steps(self) -> str:
        """The commands that make fresh streams draft (empty when they were kept)."""
        if self.kept_streams:
            return ""
        folder = str(self.path)
        data = f"{folder}-distill"
        return (
            "the streams are untrained: this folder decodes without drafting (no speed-up) "
            "until they are trained.  Next steps:\n"
            f"  mlx-specstream distill --model {folder} --output {data} --self-instruct 2000\n"
            f"  mlx-specstream train --model {folder} --data {data} --mode lossless\n"
            f"  mlx-specstream calibrate --model {folder}"
        )


# ----------------------------------------------------------------------------- helpers


def check_model_type(config: dict[str, Any], where: Path | str) -> str:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type '{model_type}' is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return str(model_type)


def build_model(config: dict[str, Any], where: Path | str) -> nn.Module:
    """Instantiate the mlx-lm model that ``config`` describes (random weights)."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    try:
        model = model_class(args_class.from_dict(config))
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{where}: config.json does not describe a valid model: {e}") from e
    return model


def _quantize_like_mlx_lm(
    model: nn.Module, quantization: dict[str, Any], weights: Mapping[str, mx.array]
) -> None:
    """Quantize ``model``'s layers the way ``mlx_lm.utils.load_model`` does for ``config``."""
    from mlx_lm.utils import infer_quant_config

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def _shape(a: mx.array) -> tuple[int, ...]:
    return tuple(a.shape)


def check_weights(
    shapes: dict[str, Shape],
    expected: dict[str, Shape],
    origin: dict[str, str],
    where: Path | str,
) -> None:
    """Every expected tensor is present with the expected shape; nothing unexpected."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [
        (k, expected[k], shapes[k])
        for k in sorted(set(expected) & set(shapes))
        if expected[k] != shapes[k]
    ]
    problems = []
    if wrong:
        lines = [
            f"  {k} (in {origin.get(k, '?')}): expected shape {e} from config.json, got {a}"
            for k, e, a in wrong[:8]
        ]
        more = f"\n  ... and {len(wrong) - 8} more" if len(wrong) > 8 else ""
        problems.append(f"{len(wrong)} tensor(s) do not match the config:\n" + "\n".join(lines))
        problems[-1] += more
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" ... ({len(missing)} in all)" if len(missing) > 8 else ""
        )
        problems.append(f"missing tensor(s): {shown}")
    if unexpected:
        shown = ", ".join(unexpected[:8])
        if len(unexpected) > 8:
            shown += f" ... ({len(unexpected)} in all)"
        problems.append(f"unexpected tensor(s) the model does not use: {shown}")
    if problems:
        raise ValueError(
            f"{where}: the weights do not fit the architecture in config.json:\n"
            + "\n".join(problems)
        )


def save_weights(folder: Path, weights: dict[str, mx.array]) -> list[str]:
    """mlx-lm's layout: one model.safetensors or model-0000i-of-0000n shards, and the index."""
    shards: list[dict[str, mx.array]] = []
    size = 0
    for k, v in weights.items():
        if not shards or size + v.nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    n = len(shards)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if n > 1 else "model.safetensors"
    weight_map = {}
    names = []
    for i, shard in enumerate(shards):
        name = fmt.format(i + 1, n)
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
        names.append(name)
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=4)
    return names + ["model.safetensors.index.json"]


def _progress(items: list[str], verbose: bool, desc: str):
    if not verbose:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor", file=sys.stderr, leave=False)


def _read_source(src: Path, keep_gguf_quant: bool) -> Source:
    if not src.exists():
        raise FileNotFoundError(
            f"{src} does not exist; pass a Hugging Face model folder or a .gguf file"
        )
    if src.is_dir():
        if keep_gguf_quant:
            raise ValueError("--keep-gguf-quant applies to .gguf sources only")
        return hf.read_hf_folder(src)
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or src.suffix.lower() == ".gguf":
        return gguf.read_gguf(src, keep_quant=keep_gguf_quant)
    raise ValueError(
        f"{src} is neither a folder nor a GGUF file; pass a Hugging Face model folder "
        "(config.json, *.safetensors, tokenizer) or a .gguf file"
    )


def existing_streams(
    dst: Path, model: nn.Module, config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, mx.array]] | str:
    """The ``speculative_streaming`` section and streams of the folder ``dst`` when they fit
    ``model`` (same hidden size, layer count and stream tensor shapes); otherwise a sentence
    saying why not (empty when ``dst`` has no streams)."""
    streams_file, config_file = dst / STREAMS_FILE, dst / "config.json"
    if not (dst.is_dir() and streams_file.is_file() and config_file.is_file()):
        return ""
    try:
        with open(config_file, encoding="utf-8") as f:
            old_config = json.load(f)
        section = old_config.get(CONFIG_KEY)
        if not isinstance(section, dict):
            return f"{config_file} has no '{CONFIG_KEY}' section"
        for key in ("hidden_size", "num_hidden_layers"):
            if old_config.get(key) != config.get(key):
                return (
                    f"{key} differs ({old_config.get(key)} in {dst}, {config.get(key)} in the "
                    "new model)"
                )
        spec = SpecStreamConfig.from_dict(section)
        spec.validate(int(config.get("num_hidden_layers", 0)))
        from ..model import init_stream_params

        expected = {k: _shape(v) for k, v in init_stream_params(model, spec).items()}
        old = mx.load(str(streams_file))
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        return f"cannot read them ({e})"
    got = {k: _shape(v) for k, v in old.items()}
    if got != expected:
        return f"{STREAMS_FILE} does not match the new model's stream tensors"
    return section, old


# ----------------------------------------------------------------------------- convert


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    quantize_bits: int | None = None,
    group_size: int = 64,
    force: bool = False,
    spec_config: SpecStreamConfig | None = None,
    keep_gguf_quant: bool = False,
    seed: int = 0,
    verbose: bool = True,
    progress: bool | None = None,
    keep_streams: bool = True,
) -> ConvertResult:
    """Convert ``src`` (HF folder, .gguf or a built-in model's name such as
    ``Qwen/Qwen2.5-Coder-0.5B-Instruct``) to a model folder ``dst``; see :func:`convert`.

    keep_streams: when ``force`` replaces a folder whose streams (``specstream.safetensors``)
    fit the new model, keep them and its ``speculative_streaming`` section (calibrated tree,
    cost ratio...) instead of writing fresh ones; ``spec_config`` is then not used.
    verbose prints the summary (folder, extra parameters); progress shows a tqdm bar over the
    tensors (default: as verbose).
    """
    t0 = time.perf_counter()
    from ..models import resolve_source

    src, dst = resolve_source(src, verbose=verbose), Path(dst).expanduser()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize_bits is not None:
        if quantize_bits not in QUANT_BITS:
            raise ValueError(f"quantize_bits must be one of {QUANT_BITS}, got {quantize_bits}")
        if group_size not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128, got {group_size}")
        if keep_gguf_quant:
            raise ValueError("choose either quantize_bits or keep_gguf_quant, not both")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise FileExistsError(f"{dst} already exists; pass --force (force=True) to replace it")
    if dst.resolve() == src.resolve():
        raise ValueError("the destination must differ from the source")
    spec_config = spec_config or SpecStreamConfig()

    source = _read_source(src, keep_gguf_quant)
    config = dict(source.config)
    model_type = check_model_type(config, source.path)
    if source.quantization is not None and quantize_bits is not None:
        raise ValueError(f"{src} is already quantized; convert a float checkpoint to quantize")
    num_layers = int(config.get("num_hidden_layers", 0))
    spec_config.validate(num_layers)

    model = build_model(config, source.path)
    weights: Mapping[str, mx.array] = source.weights
    if not source.sanitized and hasattr(model, "sanitize"):
        weights = model.sanitize(dict(weights))
    if source.quantization is not None:
        _quantize_like_mlx_lm(model, source.quantization, weights)
    expected = {k: _shape(v) for k, v in tree_flatten(model.parameters())}
    shapes = (
        source.shapes() if weights is source.weights else {k: _shape(v) for k, v in weights.items()}
    )
    check_weights(shapes, expected, source.origin, source.path)

    notes: list[str] = []
    kept: tuple[dict[str, Any], dict[str, mx.array]] | None = None
    if force and dst.is_dir():
        found = existing_streams(dst, model, config) if keep_streams else ""
        if isinstance(found, tuple):
            kept = found
            spec_config = SpecStreamConfig.from_dict(kept[0])
            tuned = [
                k
                for k in ("tree_paths", "draft_cost_ratio", "tree_costs")
                if kept[0].get(k) not in (None, 0, 0.0, [])
            ]
            notes.append(
                f"kept the existing streams ({STREAMS_FILE}) and '{CONFIG_KEY}' settings of "
                f"{dst}"
                + (f" ({', '.join(tuned)})" if tuned else "")
                + "; pass --fresh-streams (keep_streams=False) to start over"
            )
        elif found:
            notes.append(f"wrote fresh streams: the existing ones in {dst} do not fit ({found})")
        elif not keep_streams and (dst / STREAMS_FILE).exists():
            notes.append(f"replaced the existing streams of {dst} with fresh ones")

    target = DTYPES[dtype]
    tmp = make_temp_dir(dst)
    try:
        loaded: dict[str, mx.array] = {}
        for name in _progress(
            list(expected), verbose if progress is None else progress, "converting"
        ):
            try:
                value = weights[name]  # a lazy source reads (dequantizes) the tensor here
                if mx.issubdtype(value.dtype, mx.floating):
                    value = value.astype(target)
                mx.eval(value)
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(
                    f"cannot read tensor {name} from {source.origin.get(name, src.name)} ({e}); "
                    "the file is corrupt or truncated"
                ) from e
            loaded[name] = value
        del weights
        source.weights = {}
        model.load_weights(list(loaded.items()), strict=True)
        del loaded
        from mlx_lm.utils import get_total_parameters

        base_parameters = int(get_total_parameters(model))

        from ..model import init_stream_params

        streams = kept[1] if kept else init_stream_params(model, spec_config, seed=seed)
        streams = {
            k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in streams.items()
        }
        mx.eval(streams)

        quantization = source.quantization
        if quantize_bits is not None:
            from mlx_lm.utils import quantize_model

            model, config = quantize_model(model, config, group_size, quantize_bits)
            quantization = config["quantization"]

        params = dict(tree_flatten(model.parameters()))
        files = save_weights(tmp, params)
        del params

        config.pop(CONFIG_KEY, None)
        config.pop("quantization_config", None)
        if quantization is not None:
            config["quantization"] = quantization
        else:
            config.pop("quantization", None)
        config["torch_dtype"] = dtype
        section = dict(kept[0]) if kept else spec_config.to_dict()
        if not kept and section.get("tree_paths") is None:
            # Fresh streams accept nothing yet: until they are trained (and the tree is
            # calibrated) a one-node tree, i.e. plain decoding, is the fastest choice.
            section["tree_paths"] = []
        config[CONFIG_KEY] = section
        from mlx_lm.utils import save_config

        save_config(config, tmp / "config.json")
        files.append("config.json")

        mx.save_safetensors(str(tmp / STREAMS_FILE), streams, metadata={"format": "mlx"})
        files.append(STREAMS_FILE)
        source.write_tokenizer(tmp)
        files = sorted(set(files) | {p.name for p in tmp.iterdir()})

        move_into_place(tmp, dst, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    hidden = int(config["hidden_size"])
    result = ConvertResult(
        path=dst,
        source_format=source.kind,
        model_type=model_type,
        hidden_size=hidden,
        num_layers=num_layers,
        dtype=dtype,
        base_parameters=base_parameters,
        extra_parameters=spec_config.extra_parameters(hidden),
        stream_file_parameters=sum(v.size for v in streams.values()),
        quantization=quantization,
        spec_config=spec_config,
        seconds=time.perf_counter() - t0,
        files=files,
        kept_streams=kept is not None,
        notes=notes,
    )
    if verbose:
        print(result.summary())
    return result


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], **options: Any) -> Path:
    """Convert a Hugging Face folder or a .gguf file into a speculative-streaming model folder.

    The folder at ``dst`` loads with plain ``mlx_lm.load`` and additionally holds
    ``config.json["speculative_streaming"]`` (``spec_config``, default ``SpecStreamConfig()``)
    and freshly initialised stream parameters in ``specstream.safetensors``.

    The options are :func:`convert_checkpoint`'s:
    dtype: float32 (default; best on CPUs), float16 or bfloat16 for float weights.
    quantize_bits / group_size: quantize linear layers with mlx-lm (4 or 8 bits typical).
    keep_gguf_quant: keep a GGUF's own Q4_0/Q4_1/Q8_0 quantization instead of dequantizing.
    force: replace an existing ``dst`` (only once the new folder is complete); streams of
    ``dst`` that fit the new model are kept with their settings unless ``keep_streams`` is False.
    spec_config, seed, verbose: the streams' settings, their initialisation, the summary.
    Returns the path written; :func:`convert_checkpoint` returns the full result.
    """
    return convert_checkpoint(src, dst, **options).path
