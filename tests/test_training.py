"""Training: the lossless guarantee, learning on tiny data, data formats, checkpoints,
distillation and fusing.  Tiny models, a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import mlx_specstream  # noqa: F401  (BLAS before mlx.core)
from mlx_specstream.config import CONFIG_KEY, STREAMS_FILE, SpecStreamConfig
from mlx_specstream.training.data import (
    encode_record,
    iterate_micro_batches,
    load_split,
    make_batches,
)
from mlx_specstream.training.objective import ngram_terms
from mlx_specstream.training.trainer import (
    TrainConfig,
    evaluate,
    frozen_features,
    prepare_model,
    save_streams,
    stream_forward,
    stream_hidden,
    train,
)
from tinymodels import cyclic_batches, main_logits, tiny_model

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

VOCAB = 64


def test_stream_forward_matches_model():
    model = tiny_model("qwen3", lora_rank=4, random_lora=True)
    toks = mx.random.randint(0, VOCAB, (2, 13), key=mx.random.key(1))
    main, sl, _ = model(toks, with_streams=True)
    feats = frozen_features(model, toks, with_main=True)
    assert mx.allclose(stream_forward(model, feats), sl, atol=1e-4).item()
    assert mx.allclose(feats.main_logits, main, atol=1e-4).item()


def test_ngram_loss_shifts():
    V = 5
    tokens = mx.array([[0, 1, 2, 3, 4]])
    targets = mx.array([[False, True, True, True, True]])
    # logits that predict x+1 for main, x+1+j for stream j, perfectly
    eye = mx.eye(V) * 50
    main = eye[(tokens + 1) % V]
    streams = mx.stack([eye[(tokens + 1 + j) % V] for j in (1, 2)], axis=2)
    t = ngram_terms(tokens, targets, main, streams, exit_logits=None)
    assert t.count["main"].item() == 4 and t.count["s1"].item() == 3 and t.count["s2"].item() == 2
    for k in ("main", "s1", "s2"):
        assert t.correct[k].item() == t.count[k].item()
    assert t.loss.item() < 1e-6


def test_lossless_training_learns_and_keeps_main_bit_identical():
    model = prepare_model(
        tiny_model("llama"),
        SpecStreamConfig(num_streams=2, stream_layers=2, tree_topk=[2, 1], stream_lora_rank=4),
    )
    batches = cyclic_batches()
    probe = mx.array(batches[0].tokens)
    ref = main_logits(model, probe)
    base_before = {k: np.array(v) for k, v in tree_flatten(model.base.parameters())}
    tc = TrainConfig(iters=40, lr=1e-2, cache_gb=0.1, seed=0)
    report = train(model, batches, batches, tc, log=lambda s: None, progress=False)
    before, after = report["valid_before"], report["valid_after"]
    for s in ("s1", "s2"):
        assert after[s]["ce"] < before[s]["ce"]
        assert after[s]["acc"] > before[s]["acc"] + 0.2
    assert after["exit"]["ce"] < before["exit"]["ce"]
    assert report["streams_phase"]["loss"]["s1"] < before["s1"]["ce"]
    # the lossless guarantee: the main stream is bit-for-bit the base model's
    assert mx.array_equal(main_logits(model, probe), ref).item()
    for k, v in tree_flatten(model.base.parameters()):
        assert np.array_equal(np.array(v), base_before[k]), k
    assert after["main"]["acc"] == before["main"]["acc"]


def test_exit_adapter_second_phase():
    model = prepare_model(tiny_model("llama"), SpecStreamConfig(num_streams=2, stream_layers=2,
                                                                tree_topk=[2, 1]))
    batches = cyclic_batches()
    exit_a = np.array(model.streams.exit_adapter.b)
    tc = TrainConfig(iters=5, lr=1e-2, exit_phase="after", exit_iters=10, cache_gb=0.1)
    report = train(model, batches, batches, tc, log=lambda s: None, progress=False)
    assert "exit_phase" in report
    assert not np.array_equal(np.array(model.streams.exit_adapter.b), exit_a)
    assert report["valid_after"]["exit"]["ce"] < report["valid_before"]["exit"]["ce"]


def test_checkpoint_and_resume(tmp_path: Path):
    spec = SpecStreamConfig(num_streams=2, stream_layers=2, tree_topk=[2, 1], stream_lora_rank=2)
    batches = cyclic_batches()

    def run(**kw) -> dict[str, np.ndarray]:
        model = prepare_model(tiny_model("llama"), spec, reinit=True, seed=3)
        tc = TrainConfig(iters=6, lr=5e-3, grad_accum=2, seed=1, cache_gb=0.1, **kw)
        train(model, batches, [], tc, log=lambda s: None, progress=False)
        return {k: np.array(v) for k, v in model.stream_parameters().items()}

    full = run()
    ck = tmp_path / "ck"
    run(checkpoint_every=2, checkpoint_dir=str(ck), stop_at=4)
    state = json.loads((ck / "streams" / "state.json").read_text())
    assert state["step"] == 4
    resumed = run(checkpoint_every=2, checkpoint_dir=str(ck), resume=True)
    for k in full:
        np.testing.assert_allclose(resumed[k], full[k], rtol=1e-5, atol=1e-6)
    assert json.loads((ck / "streams" / "state.json").read_text())["step"] == 6


def test_micro_batch_order_resumes():
    a = iterate_micro_batches(5, seed=2)
    seq = [next(a) for _ in range(13)]
    b = iterate_micro_batches(5, seed=2, start=7)
    assert [next(b) for _ in range(6)] == seq[7:]
    assert sorted(seq[:5]) == list(range(5))


# -- data formats, through a real (tiny) tokenizer with a ChatML template ----------------
@pytest.fixture(scope="module")
def tiny_tok(tiny_folder: Path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_folder)


def test_data_formats_parse(tiny_tok, tmp_path: Path):
    text, off = encode_record({"text": "Hello there! How are you today?"}, tiny_tok)
    assert off == 0 and text[-1] == tiny_tok.eos_token_id
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    pre = tiny_tok.apply_chat_template(prompt, add_generation_prompt=True)
    toks, off = encode_record(
        {"prompt": "What is the capital of France?", "completion": "Paris."}, tiny_tok
    )
    assert off == len(pre) and toks[:off] == pre and len(toks) > off
    msgs = prompt + [{"role": "assistant", "content": "Paris."}]
    toks2, off2 = encode_record({"messages": msgs}, tiny_tok)
    assert (toks2, off2) == (toks, off)
    _, off3 = encode_record({"messages": msgs}, tiny_tok, mask_prompt=False)
    assert off3 == 0
    cut, off4 = encode_record({"messages": msgs, "truncated": True}, tiny_tok)
    assert off4 == off and len(cut) < len(toks)
    with pytest.raises(ValueError):
        encode_record({"foo": 1}, tiny_tok)
    # a folder of each format loads and batches
    for rec in ({"text": "The quick brown fox."}, {"prompt": "hi", "completion": "Hello there!"},
                {"messages": msgs}):
        d = tmp_path / next(iter(rec))
        d.mkdir()
        (d / "train.jsonl").write_text((json.dumps(rec) + "\n") * 3)
        ex = load_split(d, "train", tiny_tok)
        batches = make_batches(ex, 64)
        assert sum(b.tokens.shape[0] for b in batches) == 3
        b = batches[0]
        assert b.targets.sum() > 0 and not b.targets[:, 0].any()


def test_train_cli_saves_streams_and_loads(tiny_folder: Path, tmp_path: Path):
    from mlx_specstream import load
    from mlx_specstream.cli import main

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": "hi", "completion": "Hello there! How are you today?"},
            {"text": "The quick brown fox jumps over the lazy dog."}]
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    out = tmp_path / "streams"
    rc = main(["train", "--model", str(tiny_folder), "--data", str(data), "--adapter-path",
               str(out), "--iters", "3", "--stream-lora-rank", "4", "--num-streams", "2",
               "--stream-layers", "2", "--no-progress", "--report", str(tmp_path / "r.json")])
    assert rc == 0
    section = json.loads((out / "config.json").read_text())[CONFIG_KEY]
    assert section["stream_lora_rank"] == 4 and section["num_streams"] == 2
    assert (out / STREAMS_FILE).exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["lossless_check"] is True
    model, _ = load(tiny_folder, streams_path=out)
    saved = mx.load(str(out / STREAMS_FILE))
    for k, v in model.stream_parameters().items():
        assert mx.array_equal(v, saved[k]).item()


@pytest.mark.parametrize("valid", ["empty", "absent"])
def test_train_cli_without_validation_records(tiny_folder: Path, tmp_path: Path, capsys,
                                              valid: str):
    """A distill run of fewer than 20 answers writes an empty valid.jsonl: training runs
    without validation and says so, as when the file is absent."""
    from mlx_specstream.cli import main

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": "hi", "completion": "Hello there! How are you today?"}]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    if valid == "empty":
        (data / "valid.jsonl").write_text("")
    rc = main(["train", "--model", str(tiny_folder), "--data", str(data), "--adapter-path",
               str(tmp_path / "streams"), "--iters", "1", "--num-streams", "2",
               "--stream-layers", "1", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "training without validation" in out and "0 valid records" in out
    assert (tmp_path / "streams" / STREAMS_FILE).exists()


def test_save_streams_into_model_folder_keeps_config(tiny_folder: Path, tmp_path: Path):
    import shutil

    from mlx_specstream import load

    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    with pytest.warns(UserWarning, match="untrained"):
        model, _ = load(folder)
    model = prepare_model(model, SpecStreamConfig(num_streams=2, stream_layers=1,
                                                  tree_topk=[2, 1]))
    save_streams(model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg[CONFIG_KEY]["stream_layers"] == 1
    assert not list(folder.glob(".*tmp*"))
    model2, _ = load(folder)
    assert model2.cfg.stream_layers == 1


def test_distill_writes_resumable_jsonl(tiny_folder: Path, tmp_path: Path):
    from mlx_specstream.training.distill import distill

    from mlx_lm.utils import load

    base, tok = load(str(tiny_folder))
    prompts = [f"question {i}: the quick brown fox?" for i in range(24)]
    out = tmp_path / "d"
    s1 = distill(base, tok, prompts[:6], out, max_tokens=5, batch_size=4, progress=False)
    assert s1["written"] == 6
    s2 = distill(base, tok, prompts, out, max_tokens=5, batch_size=4, progress=False)
    assert s2["already_done"] == 6 and s2["written"] == 18
    lines = [json.loads(x) for f in ("train", "valid") for x in
             (out / f"{f}.jsonl").read_text().splitlines()]
    assert len(lines) == 24
    assert sorted(r["messages"][0]["content"] for r in lines) == sorted(prompts)
    assert all(r["messages"][1]["role"] == "assistant" for r in lines)
    assert len((out / "valid.jsonl").read_text().splitlines()) == 1  # every 20th prompt
    # the records are valid training data
    assert load_split(out, "train", tok)
    # an interrupted write (partial last line) is dropped and redone
    f = out / "train.jsonl"
    data = f.read_text().splitlines(keepends=True)
    f.write_text("".join(data[:-1]) + data[-1][:10])
    s3 = distill(base, tok, prompts, out, max_tokens=5, batch_size=4, progress=False)
    assert s3["written"] == 1
    assert len(f.read_text().splitlines()) == len(data)


def test_task_mode_and_fuse(tiny_folder: Path, tmp_path: Path):
    from mlx_specstream.cli import main
    from mlx_specstream.training.fuse import fuse

    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load as lm_load
    from mlx_lm.utils import load_model

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": "hi", "completion": "Hello there! How are you today?"}] * 4
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ad = tmp_path / "adapters"
    rc = main(["train", "--model", str(tiny_folder), "--data", str(data), "--mode", "task",
               "--adapter-path", str(ad), "--iters", "3", "--lr", "1e-2", "--lora-rank", "4",
               "--stream-layers", "2", "--no-progress"])
    assert rc == 0
    assert (ad / "adapters.safetensors").exists() and (ad / "adapter_config.json").exists()
    lora_base, _ = load_model(tiny_folder)
    load_adapters(lora_base, str(ad))
    toks = mx.array([[5, 9, 17, 33, 2, 8]])
    ref = lora_base(toks)
    plain = load_model(tiny_folder)[0](toks)
    assert not mx.allclose(ref, plain, atol=1e-5).item()  # the LoRA learned something

    out = fuse(tiny_folder, ad, tmp_path / "fused")
    fused, _ = lm_load(str(out))
    assert mx.allclose(fused(toks), ref, atol=1e-4).item()
    assert CONFIG_KEY in json.loads((out / "config.json").read_text())
    assert (out / STREAMS_FILE).exists()
    with pytest.raises(FileExistsError):
        fuse(tiny_folder, ad, out)
    fuse(tiny_folder, ad, out, force=True)
    assert not list(tmp_path.glob(".fused*"))


def test_evaluate_reports_every_head():
    model = tiny_model("llama")
    m = evaluate(model, cyclic_batches(3), TrainConfig())
    assert set(m) == {"main", "s1", "s2", "s3", "exit", "tpp"}
    assert all(0.0 <= v["acc"] <= 1.0 for k, v in m.items() if k != "tpp")
    assert set(m["tpp"]) == {"[3, 2, 1]", "[1, 1, 1]"}
    assert all(1.0 <= v <= 4.0 for v in m["tpp"].values())


def test_simulated_passes_walk():
    from mlx_specstream.training.trainer import simulated_passes

    # answer tokens at positions 5..14; no draft ever right: one token a pass
    assert simulated_passes(np.zeros(20, dtype=int), 5, 15) == (9, 9)
    # every draft right to depth 3: 4 tokens a pass, the last pass cut at the end
    assert simulated_passes(np.full(20, 3), 5, 15) == (9, 3)


@pytest.mark.parametrize("topk", [(3, 2, 1), (1, 1, 1)])
def test_simulated_tokens_per_pass_equal_decoding(topk):
    """Teacher-forced on the model's own greedy answer, validation predicts exactly the
    tokens per pass that speculative decoding reaches (adaptive pause off)."""
    from mlx_specstream.decode import DecodeStats, speculative_steps
    from mlx_specstream.training.data import Batch
    from mlx_specstream.training.trainer import SIMULATED_TREES
    from mlx_specstream.tree import product_tree

    assert topk in SIMULATED_TREES
    model = tiny_model("llama", seed=3, lora_rank=4, random_lora=True)
    model.cfg.draft_cost_ratio = 0.0
    cyc = cyclic_batches(1, length=12, seed=1)[0]
    prompt = [int(t) for t in cyc.tokens[0]]
    stats = DecodeStats()
    out = list(speculative_steps(model, mx.array(prompt), 40, stats, tree=product_tree(topk)))
    seq = np.array([prompt + out], dtype=np.int32)
    tgt = np.zeros_like(seq, dtype=bool)
    tgt[0, len(prompt):] = True
    m = evaluate(model, [Batch(seq, tgt)], TrainConfig())
    assert stats.forward_passes > 5 and stats.tokens_per_pass > 1.0
    assert m["tpp"][str(list(topk))] == pytest.approx(stats.tokens_per_pass)


def test_sparse_objective_equals_dense():
    from mlx_specstream.training.objective import sparse_targets
    from mlx_specstream.training.trainer import sparse_terms

    model = tiny_model("llama", lora_rank=2, random_lora=True)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (3, 11)).astype(np.int32)
    targets = np.zeros((3, 11), dtype=bool)
    targets[0, 4:11] = True
    targets[1, 7:9] = True
    targets[2, 2:6] = True
    feats = frozen_features(model, mx.array(tokens), with_main=True)
    dense = ngram_terms(mx.array(tokens), mx.array(targets), feats.main_logits,
                        stream_forward(model, feats), model.exit_logits(feats.h))
    sparse = sparse_terms(model, feats, sparse_targets(tokens, targets, 3), train_streams=True,
                          train_exit=True, alphas=None, main_logits=feats.main_logits,
                          tokens=mx.array(tokens), targets=mx.array(targets))
    for k in ("main", "s1", "s2", "s3", "exit"):
        assert sparse.count[k].item() == dense.count[k].item(), k
        assert abs(sparse.ce[k].item() - dense.ce[k].item()) < 1e-3, k
        assert sparse.correct[k].item() == dense.correct[k].item(), k
    assert abs(sparse.loss.item() - (dense.loss.item() - dense.ce["main"].item() / 13)) < 1e-4


@pytest.mark.parametrize("method", ["streams", "medusa"])
def test_task_sparse_objective_equals_dense(method: str):
    from mlx_specstream.training.objective import sparse_targets
    from mlx_specstream.training.trainer import task_sparse_terms

    cfg = {"draft_method": method} if method == "medusa" else {"lora_rank": 2, "random_lora": True}
    model = tiny_model("llama", **cfg)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, VOCAB, (3, 11)).astype(np.int32)
    targets = np.zeros((3, 11), dtype=bool)
    targets[0, 4:11] = True
    targets[1, 7:9] = True
    targets[2, 2:6] = True
    toks = mx.array(tokens)
    main, sl, el = model(toks, with_streams=True, with_exit=True)
    dense = ngram_terms(toks, mx.array(targets), main, sl, el)
    sparse = task_sparse_terms(model, toks, sparse_targets(tokens, targets, 3), train_streams=True,
                               train_exit=True, alpha0=1.0, alphas=None)
    for k in ("main", "s1", "s2", "s3", "exit"):
        assert sparse.count[k].item() == dense.count[k].item(), k
        assert abs(sparse.ce[k].item() - dense.ce[k].item()) < 1e-3, k
        assert sparse.correct[k].item() == dense.correct[k].item(), k
    assert abs(sparse.loss.item() - dense.loss.item()) < 1e-4


def test_objective_with_a_draft_vocabulary():
    """With a draft vocabulary the streams are trained on its rows of the head only: the
    loss of a target inside it is the cross-entropy among the draft vocabulary, a target
    outside it is a miss without loss."""
    from mlx_specstream.training.objective import sparse_targets
    from mlx_specstream.training.trainer import sparse_terms

    model = tiny_model("llama", lora_rank=2, random_lora=True)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, VOCAB, (2, 12)).astype(np.int32)
    targets = np.zeros((2, 12), dtype=bool)
    targets[:, 3:] = True
    subset = np.unique(tokens[:, 4:8])  # some labels inside, the rest outside
    model.set_draft_vocab(mx.array(subset))
    feats = frozen_features(model, mx.array(tokens))
    st = sparse_targets(tokens, targets, 3)
    got = sparse_terms(model, feats, st, train_streams=True, train_exit=False, alphas=None)

    logits = model.draft_logits(  # whole vocabulary, -inf outside the subset
        stream_hidden(model, feats, st.rows).reshape(-1, feats.h.shape[-1])[st.flat])
    labels = np.array(st.labels)
    inside = np.isin(labels, subset)
    assert inside.any() and not inside.all()
    lse = np.array(mx.logsumexp(logits, axis=-1))
    picked = np.take_along_axis(np.array(logits), labels[:, None], axis=-1)[:, 0]
    ce = np.where(inside, lse - picked, 0.0)
    hit = (np.array(mx.argmax(logits, axis=-1)) == labels) & inside
    stream = np.array(st.stream)
    for j, name in enumerate(["s1", "s2", "s3"]):
        assert got.count[name].item() == (stream == j).sum()
        assert got.ce[name].item() == pytest.approx(ce[stream == j].sum(), rel=1e-4, abs=1e-4)
        assert got.correct[name].item() == hit[stream == j].sum()


@pytest.mark.parametrize("subset_size", [0, 20])
def test_simulated_tokens_per_pass_with_a_draft_vocabulary(subset_size: int):
    """Validation's simulated tokens per pass follow the draft vocabulary as decoding does."""
    from mlx_specstream.decode import DecodeStats, speculative_steps
    from mlx_specstream.training.data import Batch
    from mlx_specstream.tree import product_tree

    model = tiny_model("llama", seed=3, lora_rank=4, random_lora=True)
    model.cfg.draft_cost_ratio = 0.0
    cyc = cyclic_batches(1, length=12, seed=1)[0]
    prompt = [int(t) for t in cyc.tokens[0]]
    out = list(speculative_steps(model, mx.array(prompt), 40, DecodeStats(),
                                 tree=product_tree((3, 2, 1))))
    if subset_size:  # a subset that leaves out some of the answer's tokens
        counts = np.bincount(np.array(out), minlength=VOCAB)
        keep = np.argsort(-counts, kind="stable")[:subset_size]
        model.set_draft_vocab(mx.array(keep.astype(np.int32)))
    stats = DecodeStats()
    out2 = list(speculative_steps(model, mx.array(prompt), 40, stats,
                                  tree=product_tree((3, 2, 1))))
    assert out2 == out
    seq = np.array([prompt + out], dtype=np.int32)
    tgt = np.zeros_like(seq, dtype=bool)
    tgt[0, len(prompt):] = True
    m = evaluate(model, [Batch(seq, tgt)], TrainConfig())
    assert m["tpp"]["[3, 2, 1]"] == pytest.approx(stats.tokens_per_pass)


def test_stream_attention_equals_the_masked_attention_and_its_gradient():
    """The trainer's factored attention of stream rows (no (S*g) x (T + S*g) mask) gives
    the masked attention's output and gradients, grouped-query heads included."""
    from mlx_specstream.model import build_msa_mask, causal_mask, stream_attention

    B, H, Hkv, T, g, d = 2, 4, 2, 9, 3, 8
    rows = mx.array([0, 3, 4, 8])
    L = rows.size * g
    key = mx.random.key(5)
    kq, kk, kv = mx.random.split(key, 3)
    q = mx.random.normal((B, H, L, d), key=kq)
    k = mx.random.normal((B, Hkv, T + L, d), key=kk)
    v = mx.random.normal((B, Hkv, T + L, d), key=kv)
    mask = build_msa_mask(causal_mask(T), 0, rows, g)[T:]

    def dense(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)

    def factored(q, k, v):
        return stream_attention(q, k, v, 0.3, rows, g)

    assert mx.allclose(factored(q, k, v), dense(q, k, v), atol=1e-5).item()
    w = mx.random.normal((B, H, L, d), key=mx.random.key(6))
    gd = mx.grad(lambda *a: (dense(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    gf = mx.grad(lambda *a: (factored(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(gd, gf, strict=True):
        assert mx.allclose(a, b, atol=1e-4).item()


def test_more_msa_layers_start_from_the_trained_streams() -> None:
    """Adding MSA layers below trained ones keeps every trained stream parameter (each
    layer's stream LoRA on the same layer of the model); the added layers start with a
    zero LoRA delta.  Another change (the rank) starts fresh streams."""
    model = tiny_model("llama", lora_rank=4, random_lora=True)  # 2 MSA layers of 4
    deeper = SpecStreamConfig(num_streams=3, stream_layers=3, stream_lora_rank=4)
    new = prepare_model(model, deeper)
    assert new.split == model.split - 1 and len(new.streams.stream_lora) == 3
    old_p, new_p = model.streams.parameters(), new.streams.parameters()
    assert mx.array_equal(new_p["stream_embeddings"], old_p["stream_embeddings"])
    for k in ("a", "b"):
        assert mx.array_equal(new_p["exit_adapter"][k], old_p["exit_adapter"][k])
    for i in range(2):
        for name, lora in model.streams.stream_lora[i].items():
            assert mx.array_equal(new.streams.stream_lora[i + 1][name].b, lora.b)
            assert mx.array_equal(new.streams.stream_lora[i + 1][name].a, lora.a)
    assert all(not mx.any(lora.b).item() for lora in new.streams.stream_lora[0].values())
    other = prepare_model(model, SpecStreamConfig(num_streams=3, stream_layers=3,
                                                  stream_lora_rank=8))
    assert not mx.array_equal(other.streams.stream_embeddings,
                              model.streams.stream_embeddings)
    # the main stream is untouched: the base model's logits
    probe = mx.array([[1, 2, 3, 4]])
    assert mx.array_equal(new(probe, with_streams=False)[0], model(probe, with_streams=False)[0])
