"""Tiny random checkpoints made on the fly, for fast tests.

``make_tiny_hf_folder`` writes a Hugging Face style model folder (``config.json``,
``model.safetensors`` with HF tensor names, a small byte-level BPE tokenizer with a
ChatML chat template).  ``make_tiny_gguf`` writes the same weights as a GGUF file the
way llama.cpp lays them out (Q/K rows permuted for llama, tokenizer in the metadata).

Everything is deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB = 320

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * 2)\n",
    "SELECT name, age FROM people WHERE age > 30 ORDER BY name;",
    "Hello there! How are you today? I am fine, thank you.",
    "In 2024 there were 365 days, 12 months and 52 weeks.",
    "Speculative streaming lets one model draft and verify its own tokens.",
    "the theory of the thing is that they think there is another",
    "Überraschung: naïve café, 東京, emoji 🙂 and math ∑ x² ≤ 10.",
]

_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "mlp_bias": False},
    "mistral": {"architectures": ["MistralForCausalLM"], "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False},
}


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_json() -> str:
    """A tiny byte-level BPE tokenizer (JSON string) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A", pair="$A $B:1", special_tokens=[]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_config(model_type: str = "llama", **overrides: Any) -> dict[str, Any]:
    """The config.json of a tiny model of ``model_type`` (4 layers, hidden 64)."""
    if model_type not in _DEFAULTS:
        raise ValueError(f"tiny models exist for {sorted(_DEFAULTS)}, not {model_type!r}")
    config: dict[str, Any] = {
        "model_type": model_type,
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "vocab_size": TOKENIZER_VOCAB,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    config.update(_DEFAULTS[model_type])
    config.update(overrides)
    return config


def tiny_hf_weights(config: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights with Hugging Face tensor names for ``config``."""
    rng = np.random.default_rng(seed)
    h = config["hidden_size"]
    ff = config["intermediate_size"]
    nh = config["num_attention_heads"]
    nkv = config["num_key_value_heads"]
    hd = config.get("head_dim") or h // nh
    v = config["vocab_size"]
    qwen2 = config["model_type"] == "qwen2"
    qwen3 = config["model_type"] == "qwen3"

    def lin(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def norm(dim: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32)

    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((v, h)).astype(np.float32)
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = lin(nh * hd, h)
        w[p + "self_attn.k_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = lin(nkv * hd, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, nh * hd)
        if qwen2:
            for name, dim in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
                w[p + f"self_attn.{name}.bias"] = (0.1 * rng.standard_normal(dim)).astype(
                    np.float32
                )
        if qwen3:
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        w[p + "mlp.gate_proj.weight"] = lin(ff, h)
        w[p + "mlp.up_proj.weight"] = lin(ff, h)
        w[p + "mlp.down_proj.weight"] = lin(h, ff)
    w["model.norm.weight"] = norm(h)
    if not config.get("tie_word_embeddings", False):
        w["lm_head.weight"] = lin(v, h)
    return w


def _tokenizer_config() -> dict[str, Any]:
    tok = json.loads(tiny_tokenizer_json())
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in sorted(t) if k != "id"} for t in tok["added_tokens"]
        },
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tiny_tokenizer(path: str | Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    tc = _tokenizer_config()
    (path / "tokenizer_config.json").write_text(json.dumps(tc, indent=2), encoding="utf-8")
    stm = {k: tc[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (path / "special_tokens_map.json").write_text(json.dumps(stm, indent=2), encoding="utf-8")


def make_tiny_hf_folder(
    path: str | Path,
    model_type: str = "llama",
    *,
    seed: int = 0,
    num_shards: int = 1,
    dtype: str = "float32",
    tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Write a tiny random HF-style model folder at ``path`` and return its path.

    model_type: llama, mistral, qwen2 (q/k/v biases) or qwen3 (q_norm/k_norm).
    overrides: config.json keys (hidden_size, num_hidden_layers, tie_word_embeddings, ...).
    num_shards > 1 writes ``model-0000i-of-0000n.safetensors`` plus an index.
    dtype: float32, float16 or bfloat16 for the stored tensors.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(model_type, **overrides)
    config["torch_dtype"] = dtype
    weights = tiny_hf_weights(config, seed=seed)
    (path / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    if dtype == "bfloat16":
        # safetensors.numpy has no bfloat16; go through mlx for this one case.
        _save_with_mlx(path, weights, num_shards, dtype)
    else:
        np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
        arrays = {k: v.astype(np_dtype) for k, v in weights.items()}
        for fname, names in _shard_names(list(arrays), num_shards):
            save_file({k: arrays[k] for k in names}, str(path / fname), {"format": "pt"})
        if num_shards > 1:
            _write_index(path, list(arrays), num_shards)
    if tokenizer:
        write_tiny_tokenizer(path)
    return path


def _shard_names(names: list[str], num_shards: int) -> list[tuple[str, list[str]]]:
    if num_shards <= 1:
        return [("model.safetensors", names)]
    chunks = np.array_split(np.arange(len(names)), num_shards)
    return [
        (f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors", [names[j] for j in chunk])
        for i, chunk in enumerate(chunks)
    ]


def _write_index(path: Path, names: list[str], num_shards: int) -> None:
    weight_map = {n: f for f, ns in _shard_names(names, num_shards) for n in ns}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _save_with_mlx(path: Path, weights: dict[str, np.ndarray], num_shards: int, dtype: str):
    import mlx.core as mx

    arrays = {k: mx.array(v).astype(getattr(mx, dtype)) for k, v in weights.items()}
    for fname, names in _shard_names(list(arrays), num_shards):
        mx.save_safetensors(str(path / fname), {k: arrays[k] for k in names}, {"format": "pt"})
    if num_shards > 1:
        _write_index(path, list(arrays), num_shards)


# ----------------------------------------------------------------------------- GGUF

_HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row permutation of a Q or K projection (convert_hf_to_gguf's ``permute``)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors_and_metadata(
    config: dict[str, Any], hf: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """llama.cpp's tensors (names, Q/K rows permuted for llama) and metadata of a tiny model.

    Metadata values are Python values tagged with their GGUF type: ("u32", 3), ("f32", 1e-5),
    ("i32[]", [...]), ("bool", False); strings and string lists as they are."""
    model_type = config["model_type"]
    arch = {"mistral": "llama"}.get(model_type, model_type)
    nh, nkv = config["num_attention_heads"], config["num_key_value_heads"]

    tensors: dict[str, np.ndarray] = {}
    for name, w in hf.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            gname = f"blk.{i}.{_HF_TO_GGUF_BLOCK[module]}.{suffix}"
            if arch == "llama" and module == "self_attn.q_proj":
                w = llama_cpp_permute(w, nh)
            elif arch == "llama" and module == "self_attn.k_proj":
                w = llama_cpp_permute(w, nkv)
        tensors[gname] = w

    tok = json.loads(tiny_tokenizer_json())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special_ids = {t["id"] for t in tok["added_tokens"] if t["special"]}
    token_type = [3 if i in special_ids else 1 for i in range(len(tokens))]

    meta: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": f"tiny-{model_type}",
        f"{arch}.block_count": ("u32", config["num_hidden_layers"]),
        f"{arch}.context_length": ("u32", config["max_position_embeddings"]),
        f"{arch}.embedding_length": ("u32", config["hidden_size"]),
        f"{arch}.feed_forward_length": ("u32", config["intermediate_size"]),
        f"{arch}.attention.head_count": ("u32", nh),
        f"{arch}.attention.head_count_kv": ("u32", nkv),
        f"{arch}.attention.key_length": ("u32", config["head_dim"]),
        f"{arch}.attention.value_length": ("u32", config["head_dim"]),
        f"{arch}.rope.freq_base": ("f32", config["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": ("f32", config["rms_norm_eps"]),
        f"{arch}.vocab_size": ("u32", config["vocab_size"]),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": ("i32[]", token_type),
        "tokenizer.ggml.bos_token_id": ("u32", 1),
        "tokenizer.ggml.eos_token_id": ("u32", 2),
        "tokenizer.ggml.unknown_token_id": ("u32", 0),
        "tokenizer.ggml.padding_token_id": ("u32", 0),
        "tokenizer.ggml.add_bos_token": ("bool", False),
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }
    return tensors, meta


def make_tiny_gguf(
    path: str | Path, model_type: str = "llama", *, seed: int = 0, **overrides: Any
) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """Write a tiny GGUF file the way llama.cpp does; return (path, config, HF weights).

    The returned HF weights are the un-permuted source weights the GGUF was made from.
    """
    import mlx.core as mx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = tiny_config(model_type, **overrides)
    hf = tiny_hf_weights(config, seed=seed)
    tensors, tagged = _gguf_tensors_and_metadata(config, hf)
    dtypes = {"u32": mx.uint32, "f32": mx.float32, "i32[]": mx.int32, "bool": mx.bool_}
    meta = {
        k: mx.array(v[1], dtype=dtypes[v[0]]) if isinstance(v, tuple) else v
        for k, v in tagged.items()
    }
    mx.save_gguf(str(path), {k: mx.array(v) for k, v in tensors.items()}, meta)
    return path, config, hf


#: Where the float16 scale fields sit in a k-quant block (ggml's block structs), so that
#: random blocks can be made valid: random bytes there could be inf or NaN.
K_QUANT_SCALE_OFFSETS = {
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def random_k_quant_blocks(rows: int, cols: int, qtype: str, seed: int = 0) -> np.ndarray:
    """Random but valid ``qtype`` blocks for a (rows, cols) tensor, as GGUF stores them."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for offset in K_QUANT_SCALE_OFFSETS[qtype]:
        scale = rng.uniform(0.001, 0.01, size=(rows, cols // block)).astype(np.float16)
        data[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def make_tiny_gguf_with_types(
    path: str | Path,
    qtype: str,
    model_type: str = "qwen2",
    *,
    seed: int = 0,
    **overrides: Any,
) -> tuple[Path, dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A tiny GGUF written with the ``gguf`` package, its 2-D weights stored as ``qtype``
    (norms and biases F32, as llama.cpp keeps them).  Types ``gguf.quants.quantize`` can
    make quantize the random source weights; the k-quants (which it cannot make) are random
    valid blocks.  Hidden and FFN sizes default to 256, the k-quant block width.

    Returns (path, config, source HF weights, HF weights as stored, dequantized by the
    ``gguf`` package and un-permuted): for k-quants the stored weights are not the source's.
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = {"hidden_size": 256, "intermediate_size": 256, "head_dim": 64}
    config = tiny_config(model_type, **{**sizes, **overrides})
    hf = tiny_hf_weights(config, seed=seed)
    tensors, tagged = _gguf_tensors_and_metadata(config, hf)
    kind = gguf.GGMLQuantizationType[qtype]
    arch = tagged.pop("general.architecture")
    writer = gguf.GGUFWriter(path, arch)
    for key, value in tagged.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            tag, v = value
            {
                "u32": writer.add_uint32,
                "f32": writer.add_float32,
                "bool": writer.add_bool,
                "i32[]": writer.add_array,
            }[tag](key, v)

    by_gguf_name = dict(zip(tensors, hf, strict=True))
    stored: dict[str, np.ndarray] = {}
    for n, (gname, w) in enumerate(tensors.items()):
        if w.ndim == 1:
            writer.add_tensor(gname, w)
            raw, raw_kind = w, gguf.GGMLQuantizationType.F32
        elif qtype in K_QUANT_SCALE_OFFSETS:
            raw, raw_kind = random_k_quant_blocks(*w.shape, qtype, seed=seed + n), kind
            writer.add_tensor(gname, raw, raw_dtype=kind)
        else:
            raw, raw_kind = gguf.quants.quantize(w, kind), kind
            writer.add_tensor(gname, raw, raw_dtype=kind)
        value = gguf.quants.dequantize(raw, raw_kind).reshape(w.shape).astype(np.float32)
        hf_name = by_gguf_name[gname]
        if model_type in ("llama", "mistral") and hf_name.endswith(
            ("q_proj.weight", "k_proj.weight")
        ):
            heads = config["num_attention_heads" if "q_proj" in hf_name else "num_key_value_heads"]
            value = llama_cpp_unpermute(value, heads)
        stored[hf_name] = value
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, config, hf, stored


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`llama_cpp_permute`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
