"""Qwen2-family tokenizers built from GGUF metadata (byte-level BPE, pre-tokenizer 'qwen2'),
on a hand-made vocabulary whose ids can be traced by hand, and on the real file (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx_specstream  # noqa: F401  (installs the BLAS before mlx.core)
from mlx_specstream.convert.gguf import build_tokenizer, build_tokenizer_files

import pytest

TEXTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "请用Python写一个快速排序。",
    "Emoji 🙂🚀, digits 2024 and 3.14159, café naïve",
    "  indented\ttabs\r\n\n\n  x",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tiny_qwen2_meta(pre: str = "qwen2") -> dict:
    """GGUF tokenizer metadata: the 256 byte symbols (ids 0..255; '!'..'~' first, at 0..93
    as in GPT-2's and Qwen2's vocabularies), five merges, then Qwen2's three special tokens."""
    alphabet = [
        _bytes_to_unicode()[b]
        for b in sorted(
            _bytes_to_unicode(), key=lambda b: (b not in range(ord("!"), ord("~") + 1), b)
        )
    ]
    merges = ["Ġ t", "h e", "Ġt he", "2 0", "i n"]
    merged = ["Ġt", "he", "Ġthe", "20", "in"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = alphabet + merged + specials
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - 3) + [3, 3, 3],
        "tokenizer.ggml.bos_token_id": len(tokens) - 3,
        "tokenizer.ggml.eos_token_id": len(tokens) - 1,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}",
    }


def test_hand_traced_ids() -> None:
    meta = tiny_qwen2_meta()
    tok = build_tokenizer(meta)
    ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    # '!' is byte 33, the first symbol of GPT-2's table: id 0, so '0'..'9' are 15..24
    assert ids["!"] == 0 and tok.encode("7").ids == [22]
    # " the": Ġ t (rank 0) -> Ġt; h e (rank 1) -> he; Ġt he (rank 2) -> Ġthe
    assert tok.encode(" the").ids == [ids["Ġthe"]]
    # "the": no Ġ, so only h e merges
    assert tok.encode("the").ids == [ids["t"], ids["he"]]
    # Qwen2 splits numbers into single digits: the merge "2 0" never applies
    assert tok.encode("2024").ids == [17, 15, 17, 19]
    # special tokens are atomic, and sit right after the normal vocabulary
    assert tok.encode("<|im_start|>in<|im_end|>").ids == [
        ids["<|im_start|>"],
        ids["in"],
        ids["<|im_end|>"],
    ]
    # Qwen2 normalizes to NFC: e + combining acute encodes as the single character é
    assert tok.encode("e\u0301").ids == tok.encode("é").ids


def test_gpt2_pre_tokenizer_keeps_digit_merges() -> None:
    """The contrast: under GPT-2's split (SmolLM2's 'smollm'), "2024" is one piece and the
    merge "2 0" applies; NFC is not applied either."""
    tok = build_tokenizer(tiny_qwen2_meta(pre="smollm"))
    assert tok.encode("2024").ids[0] == 256 + 3  # "20"
    assert tok.encode("e\u0301").ids != tok.encode("é").ids


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text: str) -> None:
    tok = build_tokenizer(tiny_qwen2_meta())
    assert tok.decode(tok.encode(text).ids) == text


def test_files_load_in_mlx_lm(tmp_path: Path) -> None:
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    meta = tiny_qwen2_meta()
    config = {"max_position_embeddings": 512}
    for name, text in build_tokenizer_files(meta, config).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == (
        "<|im_end|>"
    )
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_id == len(meta["tokenizer.ggml.tokens"]) - 1
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.slow
def test_real_qwen2_tokenizer(tmp_path: Path, monkeypatch) -> None:
    """Qwen2.5-Coder's GGUF metadata: ids published with the model ("Hello" 9707, " world"
    1879; <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645; "user" 872, "\\n"
    198) and the digits 0..9 at 15..24 as in GPT-2's byte order."""
    from mlx_specstream import models
    from mlx_specstream.convert.gguf import gguf_metadata

    import gguf

    monkeypatch.setenv("MLX_SPECSTREAM_HOME", str(tmp_path))
    path = models.builtin_gguf(models.lookup("Qwen/Qwen2.5-Coder-0.5B-Instruct"))
    tok = build_tokenizer(gguf_metadata(gguf.GGUFReader(path)))
    assert tok.encode("Hello world").ids == [9707, 1879]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids[:3] == [151644, 872, 198]
    assert tok.encode("<|endoftext|><|im_end|>").ids == [151643, 151645]
    assert tok.encode("12345").ids == [16, 17, 18, 19, 20]
    for text in TEXTS:
        assert tok.decode(tok.encode(text).ids) == text
