"""The draft corpus: the context branch drafts from the model's past answers where the
context holds no match; the drafts are verified, so greedy output does not change."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from mlx_specstream import corpus as corpus_mod
from mlx_specstream.config import SpecStreamConfig
from mlx_specstream.corpus import CORPUS_FILE, DraftCorpus, hash_ngram, load_draft_corpus
from mlx_specstream.decode import DecodeStats, speculative_steps
from mlx_specstream.model import SpecStreamModel
from tinymodels import tiny_base

import mlx.core as mx
import numpy as np
import pytest
from test_decode import PROMPT, FakeModel, mlx_lm_greedy, truth


class Tok:
    """Characters are token ids."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(c) for c in text]


def test_lookup_prefers_the_longest_suffix_and_the_most_frequent_continuation() -> None:
    c = DraftCorpus.from_texts(Tok(), ["12345", "12399", "12399", "812777", "6"], eos_ids=[0])
    assert c.num_texts == 5 and c.num_tokens == 5 + 5 + 5 + 6 + 1 + 5
    assert c.lookup([7, 1, 2], 3) == [3, 9, 9]  # "12" -> "399" twice, "345" once
    assert c.lookup([8, 1, 2], 3) == [7, 7, 7]  # "812" is longer than "12"
    assert c.lookup([3, 9, 9], 4) == [0]  # a text's end token, never the next text
    assert c.lookup([3, 9], 1) == [9]
    assert c.lookup([2], 3) == []  # one token is not looked up
    assert c.lookup([5, 5], 3) == [] and c.lookup([1, 2], 0) == []
    assert c.lookup([6, 0], 2) == []  # "6<eos>" ends its text: nothing follows
    assert DraftCorpus(np.zeros(0, np.int64)).lookup([1, 2], 3) == []
    assert hash_ngram([1, 2]) != hash_ngram([2, 1]) != hash_ngram([0, 1, 2])
    with pytest.raises(ValueError, match="1-D"):
        DraftCorpus(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="-1 between"):
        DraftCorpus(np.array([3, -2]))


def test_the_index_matches_a_plain_count() -> None:
    """Random texts: every looked-up continuation is the most frequent one (first VOTE
    tokens) of the longest suffix the texts hold, as counted by brute force."""
    rng = np.random.default_rng(0)
    texts = [rng.integers(1, 5, rng.integers(3, 30)).tolist() for _ in range(60)]
    c = DraftCorpus(np.array(sum((t + [-1] for t in texts), []), np.int64))
    for _ in range(300):
        ctx = rng.integers(1, 5, 8).tolist()
        for n in range(corpus_mod.MAX_NGRAM, corpus_mod.MIN_NGRAM - 1, -1):
            follows: dict[tuple, int] = {}
            first: dict[tuple, tuple] = {}
            for t in texts:
                for i in range(len(t) - n):
                    if t[i : i + n] == ctx[-n:]:
                        f = tuple(t[i + n : i + n + corpus_mod.VOTE])
                        follows[f] = follows.get(f, 0) + 1
                        first.setdefault(f, tuple(t[i + n : i + n + 6]))
            if follows:
                best = max(follows.values())
                assert tuple(c.lookup(ctx, 6)) in {first[f] for f, k in follows.items()
                                                   if k == best}
                break
        else:
            assert c.lookup(ctx, 6) == []


def test_corpus_drafts_where_the_context_has_no_match() -> None:
    """Streams always wrong and a context that has not repeated yet: the corpus (the
    model's past output) drafts the continuation from the first passes on."""
    out_len = 24
    plain = FakeModel(3, [3, 2, 1], streams_right=False, exit_probs="uniform")
    ref_stats = DecodeStats()
    ref = list(speculative_steps(plain, PROMPT, out_len, ref_stats, lookup_branches=4))
    assert ref == truth(3, out_len)

    model = FakeModel(3, [3, 2, 1], streams_right=False, exit_probs="uniform")
    past = [3] + truth(3, 12)  # an earlier answer after the same token
    model.draft_corpus = DraftCorpus(np.array(past + [-1], np.int64))
    stats = DecodeStats()
    assert list(speculative_steps(model, PROMPT, out_len, stats, lookup_branches=4)) == ref
    assert stats.lookup_accepted > ref_stats.lookup_accepted
    assert stats.forward_passes < ref_stats.forward_passes

    off = DecodeStats()  # lookup_corpus=False: as without a corpus
    assert list(speculative_steps(model, PROMPT, out_len, off, lookup_branches=4,
                                  lookup_corpus=False)) == ref
    assert off.forward_passes == ref_stats.forward_passes
    model.cfg.lookup_corpus = False
    cfg_off = DecodeStats()
    list(speculative_steps(model, PROMPT, out_len, cfg_off, lookup_branches=4))
    assert cfg_off.forward_passes == ref_stats.forward_passes
    with pytest.raises(ValueError, match="lookup_corpus"):
        SpecStreamConfig(lookup_corpus="yes")


@pytest.mark.parametrize("own", [True, False])
def test_greedy_output_equals_mlx_lm_with_a_corpus(own: bool) -> None:
    """A corpus of the model's own output (drafts accepted) or of random tokens (drafts
    rejected): the output is mlx-lm's greedy output either way."""
    base = tiny_base("llama", seed=1)
    model = SpecStreamModel(base, SpecStreamConfig(num_streams=3, stream_layers=2))
    ref = mlx_lm_greedy(base, PROMPT, 40)
    rng = np.random.default_rng(1)
    texts = [PROMPT.tolist() + ref] if own else [rng.integers(0, 64, 50).tolist()
                                                 for _ in range(20)]
    model.draft_corpus = DraftCorpus(np.array(sum((t + [-1] for t in texts), []), np.int64))
    stats = DecodeStats()
    assert list(speculative_steps(model, PROMPT, 40, stats, lookup_branches=4)) == ref
    if own:
        assert stats.lookup_accepted > 10


def _rows(texts: list[str]) -> str:
    return "".join(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": t}]}) + "\n"
                   for t in texts)


def test_corpus_command_load_and_bad_files(api_model_dir: Path, tmp_path: Path, capsys) -> None:
    from mlx_specstream import batch_generate, generate, load
    from mlx_specstream.cli import main

    folder = tmp_path / "m"
    shutil.copytree(api_model_dir, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # untrained streams
        plain, tok = load(folder)
    assert plain.draft_corpus is None
    kw = dict(max_tokens=24, tree_topk=[2, 1], lookup_branches=4)
    ref = generate(plain, tok, "hello", **kw)
    data = tmp_path / "train.jsonl"
    data.write_text(_rows([ref, "The quick brown fox.", ref + " again"]))
    assert main(["corpus", "--model", str(folder), "--data", str(data)]) == 0
    assert "n-grams" in capsys.readouterr().out
    assert main(["corpus", "--model", str(folder), "--data", str(data)]) == 1  # no --force
    assert "--force" in capsys.readouterr().err
    assert main(["corpus", "--model", str(folder), "--data", str(data), "--force"]) == 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["corpus", "--model", str(folder), "--data", str(empty), "--force"]) == 1
    assert "no texts" in capsys.readouterr().err

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = load(folder)
    assert model.draft_corpus is not None and model.draft_corpus.num_texts == 3
    assert generate(model, tok, "hello", **kw) == ref
    assert generate(model, tok, "hello", **kw, lookup_corpus=False) == ref
    batched = batch_generate(model, tok, ["hello", "hello there"], 24, tree_topk=[2, 1],
                             lookup_branches=4)
    assert batched.texts[0] == ref
    assert batched.texts[1] == generate(plain, tok, "hello there", **kw)

    # a corpus for another vocabulary, and a file that is not a corpus
    vocab_rows = model.vocab_rows
    mx.save_safetensors(str(folder / CORPUS_FILE), {"tokens": mx.array([1, vocab_rows, -1])})
    with pytest.raises(ValueError, match="another tokenizer"):
        load_draft_corpus(folder, vocab_rows)
    (folder / CORPUS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read the draft corpus"):
        load(folder)
