"""Check a converted GGUF folder against an independent dequantization of the same file.

The reference dequantizes every tensor with the ``gguf`` package, maps llama.cpp's names to
Hugging Face's with its own table, loads them into mlx-lm's model for the folder's config
and compares the logits of a prompt with those of ``mlx_lm.load(folder)``.  For qwen2/qwen3
files (llama.cpp keeps their Q/K rows in HF order).

  python benchmarks/check_gguf_logits.py model.gguf converted-folder
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx_specstream  # noqa: F401  (installs the BLAS before mlx.core)

import gguf
import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.utils import _get_classes

BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}  # fmt: skip
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def reference_model(gguf_path: Path, config: dict):
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = []
    for t in gguf.GGUFReader(gguf_path).tensors:
        module, suffix = t.name.rsplit(".", 1)
        if module in TOP:
            name = f"{TOP[module]}.{suffix}"
        else:
            _, layer, kind = module.split(".")
            name = f"model.layers.{layer}.{BLOCK[kind]}.{suffix}"
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        value = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        weights.append((name, mx.array(value.astype(np.float32))))
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf_path", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt", default="def quicksort(items):\n    # 排序 🙂 12345\n")
    args = parser.parse_args()
    config = json.loads((args.folder / "config.json").read_text())
    converted, tokenizer = mlx_lm.load(str(args.folder))
    ids = mx.array([tokenizer.encode(args.prompt)])
    got = converted(ids)
    mx.eval(got)
    del converted
    want = reference_model(args.gguf_path, config)(ids)
    diff = float(mx.abs(got - want).max())
    print(f"{ids.shape[1]} tokens, logits max abs diff {diff:.3g} (<= 1e-3: {diff <= 1e-3})")


if __name__ == "__main__":
    main()
