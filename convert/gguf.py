"""Read a GGUF file (llama.cpp's format) into HF-named weights, a config and a tokenizer.

``mx.load`` reads F32/F16 tensors as they are, Q4_0/Q4_1 as MLX 4-bit and Q8_0 as MLX 8-bit
affine quantization with group size 32 (``.weight`` packed uint32 plus ``.scales``/
``.biases``); files with any other tensor type (k-quants, Q5_0/Q5_1, BF16, which mx.load
would turn into float16) are read through the ``gguf`` package's memory-mapped reader and
dequantized to float32 one tensor at a time, when the writer asks for it.  This module maps
llama.cpp's tensor names to Hugging Face's, undoes llama.cpp's Q/K row permutation for the
llama architecture (llama.cpp uses interleaved "normal" rope there, MLX-LM's llama the
half-split "neox" rope), builds config.json from the metadata and a byte-level BPE
``tokenizer.json`` from ``tokenizer.ggml.*``.
"""

from __future__ import annotations

import collections
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..config import SUPPORTED_MODEL_TYPES
from .source import LazyWeights, Source

GGUF_GROUP_SIZE = 32  # every GGUF block type that mx.load keeps quantized uses 32-wide blocks

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SUFFIXES = ("weight", "bias", "scales", "biases")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
#: GGUF architectures readable here ("mistral" GGUFs use the "llama" architecture).
GGUF_ARCHITECTURES = tuple(a for a in _ARCHITECTURES if a in SUPPORTED_MODEL_TYPES)

# Token types of llama.cpp's vocabulary.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1,
    2,
    3,
    4,
    5,
    6,
)

# Pre-tokenizer split patterns of known BPE vocabularies (llama.cpp's `tokenizer.ggml.pre`).
# None: GPT-2's own regex, i.e. tokenizers' ByteLevel(use_regex=True), which is what
# transformers' GGUF converter builds for SmolLM2 (its merges have no digit merges, so this
# also agrees with the digit-splitting of the original HF tokenizer).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, str | None] = {
    "default": None,
    "gpt2": None,
    "gpt-2": None,
    "smollm": None,
    "qwen2": _QWEN2_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
}

#: Vocabularies whose Hugging Face tokenizer NFC-normalizes text before splitting it.
NFC_PRE_TOKENIZERS = frozenset({"qwen2"})


def _scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        value = value.item()
    return value


def _f32(x: float) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not
    9.999999747378752e-06)."""
    return float(f"{float(x):.7g}")


def gguf_config(meta: dict[str, Any], weights: dict[str, mx.array], path: Path) -> dict[str, Any]:
    """A HF-style config.json for the model described by GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{path.name}: GGUF architecture '{arch}' is not supported; supported: "
            f"{', '.join(GGUF_ARCHITECTURES)} (Mistral GGUFs use 'llama')"
        )

    def need(key: str) -> Any:
        value = _scalar(meta, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{path.name}: GGUF metadata lacks '{arch}.{key}'")
        return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv_heads = int(_scalar(meta, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_scalar(meta, f"{arch}.attention.key_length", hidden // heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = _scalar(meta, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(tokens) if tokens else weights["token_embd.weight"].shape[0]

    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_scalar(meta, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_scalar(meta, f"{arch}.context_length", 4096)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in weights,
        "hidden_act": "silu",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in weights
        config["mlp_bias"] = False
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = _scalar(meta, f"tokenizer.ggml.{key}")
        if value is not None:
            config[hf_key] = int(value)

    scaling = _scalar(meta, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        factor = _scalar(meta, f"{arch}.rope.scaling.factor")
        if scaling == "linear" and factor:
            config["rope_scaling"] = {"type": "linear", "factor": float(factor)}
        else:
            raise ValueError(f"{path.name}: rope scaling '{scaling}' is not supported")
    if "rope_freqs.weight" in weights:
        raise ValueError(
            f"{path.name}: the model uses per-frequency rope factors (rope_freqs, Llama-3.1 "
            "style rope scaling), which cannot be rebuilt from GGUF metadata; convert the "
            "Hugging Face checkpoint instead"
        )
    return config


def unpermute_rows(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's Q/K row permutation (rows are output features; works on packed
    quantized weights, scales and biases alike since each row is quantized on its own)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows} rows into {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str) -> str:
    """The Hugging Face name of a GGUF tensor name (``blk.3.attn_q.weight`` -> ...)."""
    module, _, suffix = name.rpartition(".")
    if suffix not in _SUFFIXES:
        raise ValueError(f"unexpected GGUF tensor '{name}'")
    if module in _TOP:
        return f"{_TOP[module]}.{suffix}"
    parts = module.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{suffix}"
    raise ValueError(f"unsupported GGUF tensor '{name}' (not a llama/qwen2/qwen3 tensor)")


def _module_quantization(weights: dict[str, mx.array]) -> dict[str, dict[str, Any]]:
    """Per HF module path, the MLX quantization (bits, group size) of GGUF-quantized tensors."""
    out: dict[str, dict[str, Any]] = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        packed = weights[module + ".weight"]
        bits = packed.shape[-1] // scales.shape[-1]
        out[module] = {"group_size": GGUF_GROUP_SIZE, "bits": int(bits), "mode": "affine"}
    return out


def quantization_config(per_module: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """mlx-lm's ``quantization`` config: the most common setting as the default and a
    per-module-path entry for every module that differs from it."""
    counts = collections.Counter((q["bits"], q["group_size"]) for q in per_module.values())
    (bits, group_size), _ = counts.most_common(1)[0]
    config: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for module, q in sorted(per_module.items()):
        if (q["bits"], q["group_size"]) != (bits, group_size):
            config[module] = dict(q)
    return config


#: Tensor types ``mx.load`` reads exactly (it turns BF16 into float16, losing range and bits).
MLX_EXACT_TYPES = frozenset({"F32", "F16", "Q4_0", "Q4_1", "Q8_0"})


def read_gguf(path: Path, *, keep_quant: bool = False) -> Source:
    """Read a GGUF file; quantized tensors are dequantized (float32) unless ``keep_quant``.

    ``mx.load`` reads the files whose tensor types it reads exactly (:data:`MLX_EXACT_TYPES`);
    any other file (k-quants, Q5_0, BF16, ...) is read through the ``gguf`` package's
    memory-mapped reader and dequantized one tensor at a time, when the writer asks for it.
    """
    reader, why_not = _open_with_gguf_py(path)
    if reader is not None:
        types = {t.tensor_type.name for t in reader.tensors}
        if not types <= MLX_EXACT_TYPES:
            return _source_from_gguf_py(path, reader, types, keep_quant=keep_quant)
    try:
        raw, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise ValueError(
            f"cannot read {path.name} ({e}); the GGUF file is corrupt or truncated, or uses "
            f"a tensor type MLX cannot load ({why_not})"
        ) from e
    return _source_from_mlx(path, raw, meta, keep_quant=keep_quant)


def _open_with_gguf_py(path: Path) -> tuple[Any, str]:
    """A memory-mapped ``gguf.GGUFReader`` of ``path``, or None and the reason."""
    try:
        import gguf as gguf_py
    except ImportError:
        return None, "other tensor types are read with the gguf package: pip install gguf"
    try:
        return gguf_py.GGUFReader(path, "r"), ""
    except Exception as e:
        return None, f"the gguf package cannot read it either: {e}"


def _llama_qk_heads(config: dict[str, Any], name: str) -> int | None:
    """Heads of a llama Q/K projection tensor (HF name), whose rows llama.cpp permuted."""
    if config["model_type"] != "llama":
        return None
    parts = name.split(".")
    if len(parts) > 5 and parts[3] == "self_attn":
        return {
            "q_proj": config["num_attention_heads"],
            "k_proj": config["num_key_value_heads"],
        }.get(parts[4])
    return None


def _tokenizer_writer(files: dict[str, str]) -> Callable[[Path], None]:
    def write_tokenizer(dst: Path) -> None:
        for fname, text in files.items():
            (dst / fname).write_text(text, encoding="utf-8")

    return write_tokenizer


def _source_from_mlx(
    path: Path, raw: dict[str, mx.array], meta: dict[str, Any], *, keep_quant: bool
) -> Source:
    config = gguf_config(meta, raw, path)
    tokenizer_files = build_tokenizer_files(meta, config, path)  # fail early on bad metadata

    hf: dict[str, mx.array] = {}
    for name, value in raw.items():
        hf[hf_name(name)] = value
    for name in list(hf):
        heads = _llama_qk_heads(config, name)
        if heads is not None:
            hf[name] = unpermute_rows(hf[name], heads)

    per_module = _module_quantization(hf)
    quantization = None
    if keep_quant and per_module:
        quantization = quantization_config(per_module)
    elif per_module:
        for module, q in per_module.items():
            scales = hf.pop(module + ".scales").astype(mx.float32)
            biases = hf.pop(module + ".biases").astype(mx.float32)
            hf[module + ".weight"] = mx.dequantize(
                hf[module + ".weight"], scales, biases, q["group_size"], q["bits"]
            )
    if quantization is not None:
        config["quantization"] = quantization

    return Source(
        path=path,
        kind="gguf",
        config=config,
        weights=hf,
        origin={name: path.name for name in hf},
        quantization=quantization,
        write_tokenizer=_tokenizer_writer(tokenizer_files),
        sanitized=True,
    )


def gguf_metadata(reader: Any) -> dict[str, Any]:
    """The key/value metadata of a ``gguf.GGUFReader`` as plain Python values."""
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.")
    }


def _source_from_gguf_py(path: Path, reader: Any, types: set[str], *, keep_quant: bool) -> Source:
    import gguf as gguf_py

    float_types = {
        gguf_py.GGMLQuantizationType.F32: np.float32,
        gguf_py.GGMLQuantizationType.F16: np.float16,
    }
    if keep_quant:
        raise ValueError(
            f"{path.name} holds tensor types ({', '.join(sorted(types))}) that MLX cannot keep "
            "as they are (it keeps Q4_0, Q4_1 and Q8_0); convert without --keep-gguf-quant "
            "(dequantized) and pass -q to quantize with MLX"
        )
    meta = gguf_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = gguf_config(meta, {n: t.data for n, t in tensors.items()}, path)
    tokenizer_files = build_tokenizer_files(meta, config, path)

    by_hf = {hf_name(name): t for name, t in tensors.items()}
    shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in by_hf.items()}

    def load(name: str) -> mx.array:
        tensor = by_hf[name]
        try:
            if tensor.tensor_type in float_types:
                data = np.asarray(tensor.data, dtype=float_types[tensor.tensor_type])
            else:
                data = gguf_py.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        except NotImplementedError as e:
            raise ValueError(
                f"{path.name}: tensor {tensor.name} has type {tensor.tensor_type.name}, which "
                "the gguf package cannot dequantize"
            ) from e
        data = data.reshape(shapes[name])
        heads = _llama_qk_heads(config, name)
        if heads is not None:
            data = unpermute_rows(data, heads)
        return mx.array(data)

    return Source(
        path=path,
        kind="gguf",
        config=config,
        weights=LazyWeights(shapes, load),
        origin={name: f"{path.name} ({t.tensor_type.name})" for name, t in by_hf.items()},
        quantization=None,
        write_tokenizer=_tokenizer_writer(tokenizer_files),
        sanitized=True,
    )


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(meta: dict[str, Any], path: Path | None = None) -> Any:
    """A ``tokenizers.Tokenizer`` (byte-level BPE) from GGUF ``tokenizer.ggml.*`` metadata."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    where = path.name if path else "GGUF"
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{where}: tokenizer model '{model}' is not supported; only byte-level BPE "
            "('gpt2') GGUF vocabularies can be converted"
        )
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    merges_raw: list[str] = list(meta.get("tokenizer.ggml.merges") or [])
    if not tokens:
        raise ValueError(f"{where}: GGUF metadata has no tokenizer.ggml.tokens")
    merges = []
    for m in merges_raw:
        pair = m.split(" ")
        if len(pair) != 2:
            raise ValueError(f"{where}: malformed BPE merge {m!r}")
        merges.append((pair[0], pair[1]))
    types_arr = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types_arr] if types_arr is not None else [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{where}: {len(tokens)} tokens but {len(types)} token types")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        warnings.warn(
            f"{where}: unknown pre-tokenizer '{pre}'; using GPT-2's split pattern, which may "
            "tokenize some texts differently from llama.cpp",
            stacklevel=2,
        )
    split = PRE_TOKENIZERS.get(pre)
    add_prefix_space = bool(_scalar(meta, "tokenizer.ggml.add_space_prefix", False))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=add_prefix_space, use_regex=True
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
            ]
        )
    if pre in NFC_PRE_TOKENIZERS:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()

    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == TOKEN_CONTROL
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == TOKEN_USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    bos_id = _scalar(meta, "tokenizer.ggml.bos_token_id")
    eos_id = _scalar(meta, "tokenizer.ggml.eos_token_id")
    add_bos = bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_scalar(meta, "tokenizer.ggml.add_eos_token", False))
    single, pair, specials = "$A", "$A $B:1", []
    if add_bos and bos_id is not None:
        bos = tokens[int(bos_id)]
        single, pair = f"{bos} {single}", f"{bos} $A {bos}:1 $B:1"
        specials.append((bos, int(bos_id)))
    if add_eos and eos_id is not None:
        eos = tokens[int(eos_id)]
        single, pair = f"{single} {eos}", f"{pair} {eos}:1"
        if (eos, int(eos_id)) not in specials:
            specials.append((eos, int(eos_id)))
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=specials
    )
    return tok


def build_tokenizer_files(
    meta: dict[str, Any], config: dict[str, Any], path: Path | None = None
) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json (file -> text)."""
    tok = build_tokenizer(meta, path)
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])

    def token(key: str) -> str | None:
        idx = _scalar(meta, f"tokenizer.ggml.{key}")
        if idx is None or not 0 <= int(idx) < len(tokens):
            return None
        return tokens[int(idx)]

    added = json.loads(tok.to_str())["added_tokens"]
    special = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    special = {k: v for k, v in special.items() if v is not None}
    tokenizer_config: dict[str, Any] = {
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_scalar(meta, "tokenizer.ggml.add_eos_token", False)),
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in sorted(t) if k != "id"} for t in added
        },
        **special,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.get("max_position_embeddings", 4096),
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        tokenizer_config["chat_template"] = template

    def as_added(content: str) -> dict[str, Any]:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    special_map = {k: as_added(v) for k, v in special.items()}
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False),
    }
